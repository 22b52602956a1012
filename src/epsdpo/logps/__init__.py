"""Sequence log-probs of the policy, the reference and the two ε-perturbed policies (``../shared/SPEC.md`` §2).

One public function, :func:`perturbed_logps`, with two implementations behind ``impl=``:

- ``"eager"`` (:mod:`epsdpo.logps.eager`): full (N, T, V) logits, formulas as written; the test oracle.
- ``"chunked"`` (:mod:`epsdpo.logps.chunked`, the default): completion tokens only, ``chunk_size`` tokens at a time,
  starting from hidden states and lm_head weights when given an :class:`LMHeadInput`; the same values and gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from epsdpo.logps.chunked import chunked_perturbed_logps, default_chunk_size
from epsdpo.logps.common import LMHeadInput, PerturbedLogps
from epsdpo.logps.eager import eager_perturbed_logps
from epsdpo.logps.vocab import KERNELS, Kernel

__all__ = [
    "KERNELS",
    "Kernel",
    "LMHeadInput",
    "PerturbedLogps",
    "chunked_perturbed_logps",
    "default_chunk_size",
    "eager_perturbed_logps",
    "perturbed_logps",
]

Impl = Literal["chunked", "eager"]


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
        epsilon: the perturbation size ε in [0, 1).
        impl: ``"chunked"`` (default, memory-efficient) or ``"eager"`` (the readable specification).
        decision_dtype: None for float32 decisions (the default, and the exact rule). ``torch.bfloat16`` emulates
            the published implementation, which computed ``weaker``/``stronger`` and the policy's log-probs in the
            model dtype: mixed logits, per-token log-probs and sums are rounded to that dtype (see
            ``PerturbedLogps.decision_policy`` and SPEC §2 on why this changes which pairs move).
        chunk_size: tokens per chunk for ``impl="chunked"``; default keeps one (chunk, V) float32 buffer ≈ 256 MiB.
        published_order: with ``decision_dtype``, the published trainer's own arithmetic for the decision side
            instead of one rounding: ``((1 + ε) * f) − (ε * g)`` as three operations in that dtype (likewise the
            stronger mixture), then ``log_softmax``, the label gather and the per-sequence sum in it; the policy's
            own decision log-prob from the same low-precision ``log_softmax``. ε(f − g) below half a unit of f's
            precision then no longer vanishes into a mixture equal to f (see docs/epsilon_dpo.md).
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if decision_dtype is not None and not decision_dtype.is_floating_point:
        raise TypeError(f"decision_dtype must be a floating dtype or None, got {decision_dtype}")
    if published_order and decision_dtype is None:
        raise ValueError("published_order needs decision_dtype (the model dtype, bf16 in the published runs)")
    _validate(policy_logits, ref_logits, labels, completion_mask)
    if impl == "chunked":
        return chunked_perturbed_logps(
            policy_logits,
            ref_logits,
            labels,
            completion_mask,
            epsilon,
            decision_dtype,
            chunk_size,
            published_order,
            kernel,
        )
    if impl == "eager":
        full = [s.logits() if isinstance(s, LMHeadInput) else s for s in (policy_logits, ref_logits)]
        return eager_perturbed_logps(
            full[0], full[1], labels, completion_mask, epsilon, decision_dtype, published_order
        )
    raise ValueError(f"impl must be 'chunked' or 'eager', got {impl!r}")
