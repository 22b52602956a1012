"""ε-DPO's decision arithmetic, specified once: :class:`DecisionSpec` (``../shared/SPEC.md`` §2).

What decides a pair's step s ∈ {−1, 0, +1} is the perturbation size ε, the precision the decision-side log-probs are
computed in (float32, or a model dtype emulated once-rounded or in the published trainer's order of operations) and
the dead band τ. The run's plan builds one frozen :class:`DecisionSpec` from the config and hands the same object to
the log-probs (:func:`epsdpo.logps.compute_perturbed_logps`, which use ε, the dtype and the order) and to the loss
(:func:`epsdpo.training.pair_loss.compute_pair_losses`, which uses :meth:`DecisionSpec.logratios`, τ and ε), so the
two can never disagree. It validates itself on construction; :func:`check_epsilon` is the one statement of ε's range.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from epsdpo.logps.common import PerturbedLogps, round_to

DecisionPrecision = Literal["float32", "bfloat16", "published"]
DECISION_PRECISIONS: tuple[str, ...] = get_args(DecisionPrecision)


def check_epsilon(epsilon: float) -> float:
    """ε as a float, or a ValueError: ε-DPO's perturbation size must be in [0, 1) (β/(1−ε) is undefined at 1)."""
    if not (isinstance(epsilon, numbers.Real) and 0.0 <= epsilon < 1.0):
        raise ValueError(
            f"epsilon must be in [0, 1), got {epsilon}: pairs use β/(1+ε), β or β/(1−ε), and β/(1−ε) is undefined "
            "at ε = 1; 0 gives DPO"
        )
    return float(epsilon)


class DecisionLogratios(NamedTuple):
    """The log-ratios chosen − rejected a micro-batch's decisions compare, each (B,) float32, without gradient.

    ``z`` from the decision-side policy log-probs, ``weaker`` z⁻ (policy perturbed toward β/(1+ε)), ``stronger`` z⁺
    (toward β/(1−ε)); see :func:`epsdpo.perturbation_steps`.
    """

    z: Tensor
    weaker: Tensor
    stronger: Tensor


@dataclass(frozen=True)
class DecisionSpec:
    """Everything that defines ε-DPO's per-pair decisions; frozen, validated on construction.

    Attributes:
        epsilon: the perturbation size ε in [0, 1); the perturbed policies are softmax((1 ± ε) f_θ ∓ ε f_ref) and a
            pair's penalty is β̃ = β / (1 + ε s). 0 (DPO and the other losses): both perturbed policies are the policy.
        dtype: None for float32 decisions (the exact rule, default), else the model dtype whose rounding the
            decision-side log-probs emulate (``torch.bfloat16`` in the published runs): mixed logits, per-token
            log-probs and sums rounded to it.
        published_order: with ``dtype``, the published trainer's own arithmetic instead of one rounding: each
            mixture as three operations in ``dtype`` (``((1 + ε) * f) − (ε * g)``), then log-softmax, the label
            gather, the per-sequence sums and the chosen − rejected differences (:meth:`logratios`) in it.
        tolerance: the dead band τ ≥ 0 in nats: a pair moves only when both perturbation gaps exceed τ
            (:func:`epsdpo.perturbation_steps`); 0 is the exact rule. Used by the loss, not by the log-probs.
    """

    epsilon: float = 0.0
    dtype: torch.dtype | None = None
    published_order: bool = False
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"decision_dtype must be a floating dtype or None (float32 decisions), got {self.dtype}")
        if self.published_order and self.dtype is None:
            raise ValueError("published_order needs decision_dtype (the model dtype, bf16 in the published runs)")
        if not (isinstance(self.tolerance, numbers.Real) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"decision_tolerance must be >= 0, got {self.tolerance}")
        object.__setattr__(self, "tolerance", float(self.tolerance))

    @classmethod
    def from_precision(
        cls, epsilon: float, precision: DecisionPrecision = "float32", tolerance: float = 0.0
    ) -> DecisionSpec:
        """The spec a config's ``decision_precision`` names: ``float32`` (exact), ``bfloat16`` (float32 mixtures
        rounded once to bf16, kept for comparison) or ``published`` (bf16 in the published order of operations)."""
        if precision not in DECISION_PRECISIONS:
            raise ValueError(f"decision_precision must be one of {list(DECISION_PRECISIONS)}, got {precision!r}")
        dtype = None if precision == "float32" else torch.bfloat16
        return cls(epsilon, dtype, published_order=precision == "published", tolerance=tolerance)

    def logratios(self, logps: PerturbedLogps) -> DecisionLogratios:
        """(z, z⁻, z⁺), each (B,): chosen − rejected of the decision-side log-probs of 2B rows (0..B−1 chosen).

        In the published order each difference is rounded to ``dtype``, as the published trainer subtracts its bf16
        sequence sums (the last step of its arithmetic; the others are in the log-prob implementations).
        """
        b = logps.policy.shape[0] // 2
        out = [x[:b] - x[b:] for x in (logps.decision_policy, logps.weaker, logps.stronger)]
        if self.published_order:
            out = [round_to(x, self.dtype) for x in out]
        return DecisionLogratios(*out)
