"""Types shared by the log-prob implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from epsdpo.logps.vocab import Kernel

Impl = Literal["chunked", "eager"]


class PerturbedLogps(NamedTuple):
    """Per-sequence log-probs, each (N,) float32, summed over completion tokens.

    - ``policy``: log π_θ(y|x); the only field that carries gradient.
    - ``reference``: log π_ref(y|x).
    - ``weaker``: log-prob under softmax((1+ε) f_θ − ε f_ref), the policy at a weaker KL penalty β/(1+ε).
    - ``stronger``: log-prob under softmax((1−ε) f_θ + ε f_ref), the policy at a stronger KL penalty β/(1−ε).
    - ``decision_policy``: the policy log-prob at the precision the decisions are made in: ``policy.detach()`` by
      default; rounded like ``weaker``/``stronger`` when the decision dtype emulates a model-dtype implementation.
      Compare it, not ``policy``, with ``weaker``/``stronger``.
    """

    policy: Tensor
    reference: Tensor
    weaker: Tensor
    stronger: Tensor
    decision_policy: Tensor

    @classmethod
    def policy_only(cls, policy: Tensor) -> PerturbedLogps:
        """The log-probs of a run without a reference (the reference-free losses): ``policy`` and, detached, its
        perturbations at ε = 0 (the policy itself); ``reference`` is NaN, as there is none, so any use of it shows."""
        detached = policy.detach()
        return cls(policy, torch.full_like(detached, float("nan")), detached, detached, detached)


@dataclass(frozen=True)
class LogpsOptions:
    """How the log-probs are computed, never what (that is the :class:`~epsdpo.logps.decision.DecisionSpec`): every
    choice gives the same values to float32 rounding.

    Attributes:
        impl: ``"chunked"`` (default, memory-efficient: completion tokens only, a chunk at a time, from hidden
            states and the head when given an :class:`LMHeadInput`) or ``"eager"`` (full logits, the specification).
        chunk_size: tokens per chunk for ``impl="chunked"``; None keeps one (chunk, V) float32 buffer ≈ 256 MiB.
        kernel: how the chunked path computes each (chunk, V) block's log-sum-exps with float32 decisions
            (:mod:`epsdpo.logps.vocab`): ``auto``, ``compiled``, ``triton`` or ``eager``.
    """

    impl: Impl = "chunked"
    chunk_size: int | None = None
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        if self.impl not in get_args(Impl):
            raise ValueError(f"impl must be 'chunked' or 'eager', got {self.impl!r}")


#: the defaults: chunked, ~256 MiB chunks, the kernel picked for the device
DEFAULT_OPTIONS = LogpsOptions()


class LMHeadInput(NamedTuple):
    """Final hidden states and the output projection that turns them into logits: logits = hidden @ weight.T + bias.

    ``hidden`` is (N, T, H), ``weight`` (V, H) and ``bias`` (V,) or None. Pass these instead of logits so the chunked
    implementation never materialises the (N, T, V) logits.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def logits(self) -> Tensor:
        """The full logits (N, T, V), for the eager implementation."""
        # F.linear, exactly as the model's nn.Linear head computes them (one rounding in low precision).
        return F.linear(self.hidden, self.weight, self.bias)


def published_token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """``gather(logits.log_softmax(-1), -1, labels)`` in the logits' own dtype, as the published ε-DPO trainer
    computes per-token log-probs (its logits are the model's, bf16 in the published runs): one rounding per op."""
    return torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def round_to(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Round a float32 tensor through ``dtype`` and back (identity when ``dtype`` is None)."""
    return x if dtype is None else x.to(dtype).to(x.dtype)
