"""Sequence log-probs of the policy, the reference and the two ε-perturbed policies (``../shared/SPEC.md`` §2).

One computation, :func:`compute_perturbed_logps`, taking *what* to compute as a :class:`DecisionSpec` (ε and the
decision arithmetic, shared with the loss) and *how* as :class:`LogpsOptions`, with two implementations behind
``options.impl``:

- ``"eager"`` (:mod:`epsdpo.logps.eager`): full (N, T, V) logits, formulas as written; the test oracle.
- ``"chunked"`` (:mod:`epsdpo.logps.chunked`, the default): completion tokens only, ``chunk_size`` tokens at a time,
  starting from hidden states and lm_head weights when given an :class:`LMHeadInput`; the same values and gradients.

:func:`perturbed_logps` is the same computation with the spec's and the options' fields as keyword arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from epsdpo.logps.chunked import chunked_perturbed_logps, chunked_policy_logps, default_chunk_size
from epsdpo.logps.common import DEFAULT_OPTIONS, Impl, LMHeadInput, LogpsOptions, PerturbedLogps
from epsdpo.logps.decision import DecisionLogratios, DecisionSpec
from epsdpo.logps.eager import eager_perturbed_logps, eager_policy_logps
from epsdpo.logps.vocab import KERNELS, Kernel

__all__ = [
    "KERNELS",
    "DecisionLogratios",
    "DecisionSpec",
    "Impl",
    "Kernel",
    "LMHeadInput",
    "LogpsOptions",
    "PerturbedLogps",
    "chunked_perturbed_logps",
    "compute_perturbed_logps",
    "compute_policy_logps",
    "default_chunk_size",
    "eager_perturbed_logps",
    "perturbed_logps",
]


def _shape(side: Tensor | LMHeadInput) -> tuple[tuple[int, ...], int]:
    """((N, T), V) of logits or of the logits an LMHeadInput would produce."""
    if isinstance(side, LMHeadInput):
        if side.hidden.dim() != 3 or side.weight.dim() != 2 or side.hidden.shape[-1] != side.weight.shape[-1]:
            raise ValueError(
                f"LMHeadInput needs hidden (N, T, H) and weight (V, H); got hidden {tuple(side.hidden.shape)} "
                f"and weight {tuple(side.weight.shape)}"
            )
        return tuple(side.hidden.shape[:2]), side.weight.shape[0]
    if side.dim() != 3:
        raise ValueError(f"logits must be (N, T, V), got shape {tuple(side.shape)}")
    return tuple(side.shape[:2]), side.shape[-1]


def _validate(
    policy: Tensor | LMHeadInput, reference: Tensor | LMHeadInput, labels: Tensor, completion_mask: Tensor
) -> None:
    (p_nt, p_v), (r_nt, r_v) = _shape(policy), _shape(reference)
    if p_nt != tuple(labels.shape) or r_nt != tuple(labels.shape) or completion_mask.shape != labels.shape:
        raise ValueError(
            f"shapes disagree: policy (N, T) = {p_nt}, reference {r_nt}, labels {tuple(labels.shape)}, "
            f"completion_mask {tuple(completion_mask.shape)}; logits[:, t] must score labels[:, t]"
        )
    if p_v != r_v:
        raise ValueError(f"policy vocabulary ({p_v}) and reference vocabulary ({r_v}) differ; use the same tokenizer")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    scored = labels[completion_mask.bool()]
    if scored.numel() and (scored.min() < 0 or scored.max() >= p_v):
        bad = ((labels < 0) | (labels >= p_v)) & completion_mask.bool()
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{row}, {col}] = {int(labels[row, col])} is a completion token (completion_mask = 1) but not a "
            f"token id in [0, {p_v}); mask out ignored positions (e.g. -100) with completion_mask = 0"
        )


def compute_perturbed_logps(
    policy_logits: Tensor | LMHeadInput,
    ref_logits: Tensor | LMHeadInput,
    labels: Tensor,
    completion_mask: Tensor,
    spec: DecisionSpec,
    options: LogpsOptions = DEFAULT_OPTIONS,
) -> PerturbedLogps:
    """Per-sequence log-probs of the policy, the reference and the ε-perturbed policies, each (N,) float32.

    For each sequence n, with f the policy logits and f_ref the reference logits at each completion token t:

        policy[n]   = Σ_t log softmax(f)[y_t]                       (carries gradient)
        reference[n] = Σ_t log softmax(f_ref)[y_t]
        weaker[n]   = Σ_t log softmax((1+ε) f − ε f_ref)[y_t]       ≈ the policy at a weaker penalty β/(1+ε)
        stronger[n] = Σ_t log softmax((1−ε) f + ε f_ref)[y_t]       ≈ the policy at a stronger penalty β/(1−ε)

    (The optimal policy at β/λ is π_ref·(π*_β/π_ref)^λ; applied token by token it gives these logit mixtures;
    Lee et al. 2025, arXiv 2502.13177.) Sums run over completion tokens only, in float32 whatever the model dtype.

    Args:
        policy_logits, ref_logits: (N, T, V) logits aligned with ``labels`` (``logits[:, t]`` scores
            ``labels[:, t]``), or :class:`LMHeadInput` (hidden states and head) so the chunked path never builds
            them in full.
        labels: (N, T) token ids; any value (e.g. -100) where ``completion_mask`` is 0.
        completion_mask: (N, T), 1 on completion tokens. Rows with no completion token get 0.
        spec: ε and the arithmetic of the decision side (``weaker``, ``stronger``, ``decision_policy``): float32, or
            rounded to ``spec.dtype`` once or in the published order of operations (see :class:`DecisionSpec`,
            ``PerturbedLogps.decision_policy`` and SPEC §2 on why this changes which pairs move).
        options: the implementation, chunk size and vocabulary kernel (:class:`LogpsOptions`).
    """
    _validate(policy_logits, ref_logits, labels, completion_mask)
    if options.impl == "chunked":
        return chunked_perturbed_logps(policy_logits, ref_logits, labels, completion_mask, spec, options)
    full = [s.logits() if isinstance(s, LMHeadInput) else s for s in (policy_logits, ref_logits)]
    return eager_perturbed_logps(full[0], full[1], labels, completion_mask, spec)


def compute_policy_logps(
    policy_logits: Tensor | LMHeadInput,
    labels: Tensor,
    completion_mask: Tensor,
    options: LogpsOptions = DEFAULT_OPTIONS,
) -> Tensor:
    """The policy's sequence log-probs Σ_t log softmax(f)[y_t] alone, (N,) float32, with gradient: the ``policy``
    field of :func:`compute_perturbed_logps` without a reference (the reference-free losses), by ``options.impl``."""
    (nt, vocab) = _shape(policy_logits)
    if nt != tuple(labels.shape) or completion_mask.shape != labels.shape:
        raise ValueError(
            f"shapes disagree: policy (N, T) = {nt}, labels {tuple(labels.shape)}, completion_mask "
            f"{tuple(completion_mask.shape)}; logits[:, t] must score labels[:, t]"
        )
    if options.impl == "chunked":
        return chunked_policy_logps(policy_logits, labels, completion_mask, options.chunk_size)
    logits = policy_logits.logits() if isinstance(policy_logits, LMHeadInput) else policy_logits
    return eager_policy_logps(logits, labels, completion_mask)


def perturbed_logps(
    policy_logits: Tensor | LMHeadInput,
    ref_logits: Tensor | LMHeadInput,
    labels: Tensor,
    completion_mask: Tensor,
    epsilon: float,
    *,
    impl: Impl = "chunked",
    decision_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    published_order: bool = False,
    kernel: Kernel = "auto",
) -> PerturbedLogps:
    """:func:`compute_perturbed_logps` with ``DecisionSpec(epsilon, decision_dtype, published_order)`` and
    ``LogpsOptions(impl, chunk_size, kernel)`` given field by field (see those classes for each argument).

    ``epsilon`` is ε in [0, 1). ``decision_dtype`` None (default) gives float32 decisions, the exact rule;
    ``torch.bfloat16`` emulates the published implementation, whose decision-side log-probs were in the model dtype,
    rounded once; ``published_order`` (with ``decision_dtype``) follows the published trainer's own order of
    operations instead: ``((1 + ε) * f) − (ε * g)`` as three operations in that dtype (likewise the stronger
    mixture), then ``log_softmax``, the label gather and the per-sequence sum in it, where ε(f − g) below half a unit
    of f's precision no longer vanishes into a mixture equal to f (see docs/epsilon_dpo.md).
    """
    spec = DecisionSpec(epsilon, decision_dtype, published_order=published_order)
    options = LogpsOptions(impl, chunk_size, kernel)
    return compute_perturbed_logps(policy_logits, ref_logits, labels, completion_mask, spec, options)
