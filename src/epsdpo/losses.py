"""Preference losses and ε-DPO's per-pair perturbation decisions, as pure functions over per-pair tensors.

Notation (``../shared/SPEC.md`` §1–2), for a batch of B preference pairs:

- ``policy_chosen_logps`` = log π_θ(y_w|x), ``policy_rejected_logps`` = log π_θ(y_l|x)   (B,), summed over completion
  tokens
- ``ref_chosen_logps``, ``ref_rejected_logps``: the same under the frozen reference π_ref   (B,)
- z = log π_θ(y_w|x) − log π_θ(y_l|x),  γ = log π_ref(y_w|x) − log π_ref(y_l|x),  margin h = z − γ
- implicit rewards r_w = β (log π_θ(y_w|x) − log π_ref(y_w|x)),  r_l likewise (returned detached)

Every loss returns ``PreferenceLoss(losses, chosen_rewards, rejected_rewards)``, each of shape (B,): the per-pair
loss (reduce it yourself, e.g. ``.mean()``) and the implicit rewards used for logging and accuracy. Nothing here
touches an accelerator, a config object or another process.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from epsdpo.logps.decision import check_epsilon

__all__ = [
    "LossType",
    "beta_dpo_loss",
    "beta_dpo_weights",
    "PreferenceLoss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "perturbation_steps",
    "perturbed_betas",
]


class PreferenceLoss(NamedTuple):
    """Per-pair outputs of a preference loss, each of shape (B,)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class LossType(str, enum.Enum):
    """The preference objectives, with the capabilities the training loop needs to know about."""

    EPSILON_DPO = "epsilon_dpo"
    DPO = "dpo"
    CDPO = "cdpo"
    IPO = "ipo"
    HINGE = "hinge"
    BETA_DPO = "beta_dpo"

    def __str__(self) -> str:  # "dpo", in messages and model cards, on every Python version
        return self.value

    @property
    def needs_perturbation(self) -> bool:
        """Whether the loss needs the ε-perturbed log-probs (and so the reference's full logits)."""
        return self is LossType.EPSILON_DPO

    @property
    def uses_label_smoothing(self) -> bool:
        """Whether ``label_smoothing`` has a meaning for this loss (cDPO's conservative targets)."""
        return self in (LossType.EPSILON_DPO, LossType.DPO, LossType.CDPO)

    @property
    def has_batch_beta(self) -> bool:
        """Whether β is recomputed for every batch from margin statistics (β-DPO)."""
        return self is LossType.BETA_DPO


def _margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """h = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)), shape (B,)."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def _rewards(
    beta: float | Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Implicit rewards β (log π_θ − log π_ref) of chosen and rejected, detached (they are for reporting)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen.detach(), rejected.detach()


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}: it is the probability that a preference "
            "label is flipped (cDPO); 0 gives plain DPO."
        )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float | Tensor,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023) and, with ``label_smoothing`` ℓ > 0, conservative DPO (cDPO).

    loss = −(1 − ℓ) log σ(β h) − ℓ log σ(−β h),   h = z − γ.

    ℓ is the assumed probability that a label is flipped, so the second term pushes *against* the labelled preference
    (the published ε-DPO code has this sign wrong, which silently turns cDPO back into DPO). ``beta`` may be a float or
    a (B,) tensor of per-pair values.
    """
    _check_label_smoothing(label_smoothing)
    logits = beta * _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    chosen, rejected = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return PreferenceLoss(losses, chosen, rejected)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float | Tensor,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023): loss = (h − 1/(2β))², a squared regression of the margin onto 1/(2β).

    The IPO paper applies it to length-normalised (mean-token) log-probs; pass those if you want that variant, the
    formula is the same.
    """
    margins = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (margins - 1.0 / (2.0 * beta)) ** 2
    chosen, rejected = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return PreferenceLoss(losses, chosen, rejected)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float | Tensor,
) -> PreferenceLoss:
    """Hinge / SLiC-style loss (Zhao et al. 2023, Liu et al. 2024 RSO): loss = max(0, 1 − β h)."""
    margins = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * margins)
    chosen, rejected = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return PreferenceLoss(losses, chosen, rejected)


def perturbation_steps(
    policy_logratio: Tensor,
    weaker_logratio: Tensor,
    stronger_logratio: Tensor,
    tolerance: float = 0.0,
) -> Tensor:
    """ε-DPO's per-pair decision s ∈ {−1, 0, +1} (Lee et al. 2025, arXiv 2502.13177, Eq. for β̃).

    With z the policy's log-ratio log π_θ(y_w|x) − log π_θ(y_l|x), z⁻ the same under the policy perturbed toward a
    *weaker* KL penalty β/(1+ε) and z⁺ toward a *stronger* one β/(1−ε):

    - s = +1 if z⁻ > z > z⁺: the preference model grows more confident as the penalty weakens → relax β for this pair;
    - s = −1 if z⁺ > z > z⁻: it grows more confident as the penalty strengthens → tighten β;
    - s = 0 otherwise (not monotone in β): keep β.

    ``tolerance`` τ ≥ 0 is a dead band: a step is taken only when *both* gaps exceed τ (z⁻ − z > τ and z − z⁺ > τ for
    +1). τ = 0 is the exact rule. Why a band exists: in exact arithmetic z⁻ − z ≈ ε·a and z − z⁺ ≈ ε·a with a ≈ the
    pair's margin, so nearly every pair with a positive margin gets s = +1; the published runs computed these
    comparisons in bf16, whose resolution on summed log-probs of −100…−500 is 0.5–2 nats, which acts like a threshold
    (s = sign(a) only when ε·|a| clears the resolution). τ lets you ask for that threshold behaviour explicitly and
    reproducibly instead of as a side effect of rounding. All inputs are (B,); the result is int64 (B,).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    with torch.no_grad():
        z = policy_logratio.detach()
        weaker_gap = weaker_logratio.detach() - z  # > 0: more confident under a weaker penalty
        stronger_gap = z - stronger_logratio.detach()  # > 0: less confident under a stronger penalty
        relax = (weaker_gap > tolerance) & (stronger_gap > tolerance)
        tighten = (weaker_gap < -tolerance) & (stronger_gap < -tolerance)
        return relax.to(torch.int64) - tighten.to(torch.int64)


def perturbed_betas(beta: float | Tensor, steps: Tensor, epsilon: float) -> Tensor:
    """β̃ = β / (1 + ε s) per pair: β/(1+ε) where s = +1 (relaxed), β/(1−ε) where s = −1 (tightened), β where s = 0."""
    epsilon = check_epsilon(epsilon)  # the DecisionSpec's rule: a public function checks its own argument
    return beta / (1.0 + epsilon * steps.to(torch.float32))


def epsilon_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    steps: Tensor,
    beta: float | Tensor,
    epsilon: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """ε-DPO (Lee et al. 2025): the DPO sigmoid loss with a per-pair KL penalty β̃ = β / (1 + ε s).

    loss_i = −(1 − ℓ) log σ(β̃_i h_i) − ℓ log σ(−β̃_i h_i),  rewards r_w = β̃_i (log π_θ(y_w) − log π_ref(y_w)).

    ``steps`` are the decisions s from :func:`perturbation_steps` (constants: they carry no gradient). With ε = 0, or
    every s = 0, this is exactly :func:`dpo_loss`.
    """
    pair_betas = perturbed_betas(beta, steps, epsilon).to(policy_chosen_logps.dtype)
    return dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=pair_betas,
        label_smoothing=label_smoothing,
    )


def beta_dpo_weights(margins: Tensor, running_mean: float, running_std: float) -> Tensor:
    """β-DPO's sampling weights w_i = exp(−½ ((M_i − M₀) / σ)²) (Wu et al., NeurIPS 2024, arXiv 2407.08639).

    ``margins`` are the unscaled DPO margins M_i = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l));
    M₀ and σ their running mean and standard deviation. Pairs far from the typical margin (outliers, likely noisy
    labels or already-learnt pairs) get small weights and are less likely to be kept.
    """
    std = max(float(running_std), 1e-6)
    return torch.exp(-0.5 * ((margins.detach().float() - running_mean) / std) ** 2)


def beta_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    keep: Tensor,
    beta: float,
    kept_share: float | None = None,
) -> PreferenceLoss:
    """β-DPO's loss for one batch: the DPO loss at the batch's β on the kept pairs, scaled so that the batch sum
    divided by B is the mean over kept pairs; dropped pairs contribute 0.

    ``keep`` is a (B,) bool mask (from sampling with :func:`beta_dpo_weights`); ``beta`` the batch β
    β₀ (1 + α (mean of kept M − M₀)), computed by :class:`epsdpo.control.BetaDPOController`. ``kept_share``: the
    share of pairs kept in the whole (global) batch when this is one process's slice of it, so that every
    process scales alike; default: this batch's own share.
    """
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    kept = keep.to(out.losses.dtype)
    scale = 1.0 / kept_share if kept_share else keep.numel() / kept.sum().clamp(min=1.0)
    return PreferenceLoss(out.losses * kept * scale, out.chosen_rewards, out.rejected_rewards)
