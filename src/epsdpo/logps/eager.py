"""The readable specification of ε-DPO's perturbed sequence log-probs, over full (N, T, V) logits.

It materialises every full-vocabulary tensor it needs, exactly as the formulas read, and is the oracle the chunked
implementation is tested against. Use it for clarity and tests; use ``impl="chunked"`` for training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epsdpo.logps.common import PerturbedLogps, published_token_logps, round_to
from epsdpo.logps.decision import DecisionSpec


def _sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor, emulate_dtype: torch.dtype | None = None) -> Tensor:
    """Σ_t mask[n, t] · log softmax(logits[n, t])[labels[n, t]] in float32, shape (N,).

    With ``emulate_dtype`` the per-token log-probs and the sum are rounded to that dtype the way a model-dtype
    implementation rounds them (PyTorch reductions accumulate in float32 and round the result once).
    """
    logps = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    tokens = logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (N, T)
    tokens = round_to(tokens, emulate_dtype)
    return round_to((tokens * mask).sum(-1), emulate_dtype)


def eager_perturbed_logps(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    completion_mask: Tensor,
    spec: DecisionSpec,
) -> PerturbedLogps:
    """Policy, reference and ε-perturbed sequence log-probs from full logits (N, T, V) aligned with labels (N, T).

    weaker  = log-probs under softmax((1+ε) f_θ − ε f_ref)   (the policy at a weaker penalty β/(1+ε))
    stronger = log-probs under softmax((1−ε) f_θ + ε f_ref)  (the policy at a stronger penalty β/(1−ε))

    ``spec`` gives ε and the decision arithmetic: with ``spec.dtype`` the decision side is rounded to that dtype;
    with ``spec.published_order`` it is the published trainer's arithmetic, every operation in ``spec.dtype``:
    ``((1 + ε) * f) − (ε * g)`` as three rounded operations (likewise the stronger mixture), ``log_softmax``, the
    label gather and the per-sequence sum, all in that dtype.
    """
    epsilon, decision_dtype = spec.epsilon, spec.dtype
    mask = completion_mask.to(torch.float32)
    safe_labels = torch.where(completion_mask.bool(), labels, torch.zeros_like(labels))  # -100 → 0, masked out
    policy = _sequence_logps(policy_logits, safe_labels, mask)
    with torch.no_grad():
        f = policy_logits.detach().float()
        g = ref_logits.detach().float()
        reference = _sequence_logps(g, safe_labels, mask)
        weaker_logits = round_to((1.0 + epsilon) * f - epsilon * g, decision_dtype)
        stronger_logits = round_to((1.0 - epsilon) * f + epsilon * g, decision_dtype)
        weaker = _sequence_logps(weaker_logits, safe_labels, mask, decision_dtype)
        stronger = _sequence_logps(stronger_logits, safe_labels, mask, decision_dtype)
        if decision_dtype is None:
            decision_policy = policy.detach()
        else:
            decision_policy = _sequence_logps(f, safe_labels, mask, decision_dtype)
        if spec.published_order:
            assert decision_dtype is not None  # DecisionSpec guarantees it
            fb, gb, keep = f.to(decision_dtype), g.to(decision_dtype), completion_mask.bool()

            def published(logits: Tensor) -> Tensor:  # (N,): per-token in the dtype, zero off the mask, summed in it
                tokens = published_token_logps(logits, safe_labels).masked_fill(~keep, 0)
                return tokens.sum(-1).float()

            weaker = published(((1 + epsilon) * fb) - (epsilon * gb))
            stronger = published(((1 - epsilon) * fb) + (epsilon * gb))
            decision_policy = published(fb)
    return PerturbedLogps(policy, reference, weaker, stronger, decision_policy)


def eager_policy_logps(policy_logits: Tensor, labels: Tensor, completion_mask: Tensor) -> Tensor:
    """The ``policy`` field of :func:`eager_perturbed_logps` alone (with gradient), (N,) float32."""
    safe_labels = torch.where(completion_mask.bool(), labels, torch.zeros_like(labels))  # -100 → 0, masked out
    return _sequence_logps(policy_logits, safe_labels, completion_mask.to(torch.float32))
