"""Preference losses and ε-DPO's per-pair perturbation decisions, as pure functions over per-pair tensors.

Notation (``../shared/SPEC.md`` §1–2), for a batch of B preference pairs:

- ``policy_chosen_logps`` = log π_θ(y_w|x), ``policy_rejected_logps`` = log π_θ(y_l|x)   (B,), summed over completion
  tokens
- ``ref_chosen_logps``, ``ref_rejected_logps``: the same under the frozen reference π_ref   (B,)
- z = log π_θ(y_w|x) − log π_θ(y_l|x),  γ = log π_ref(y_w|x) − log π_ref(y_l|x),  margin h = z − γ
- implicit rewards r_w = β (log π_θ(y_w|x) − log π_ref(y_w|x)),  r_l likewise (returned detached)
- ``chosen_lengths``, ``rejected_lengths``: |y_w|, |y_l|, the completion token counts   (B,)

Every loss returns ``PreferenceLoss(losses, chosen_rewards, rejected_rewards)``, each of shape (B,): the per-pair
loss (reduce it yourself, e.g. ``.mean()``) and the implicit rewards *the method defines* (DPO's β log π_θ/π_ref,
SimPO's β/|y| log π_θ, ORPO's λ log odds, …) used for logging and accuracy. The losses with an NLL term return a
:class:`TwoTermLoss`, which adds the preference term as it enters the loss and the chosen response's mean negative
log-likelihood −log π_θ(y_w|x)/|y_w| (unweighted; the loss adds it with its weight). Nothing here touches an
accelerator, a config object or another process.

The reference-free losses (:func:`simpo_loss`, :func:`orpo_loss`, :func:`cpo_loss`, :func:`slic_loss`,
:func:`rrhf_loss`) take the policy's log-probs only.
"""

from __future__ import annotations

import enum
import math
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
    "TwoTermLoss",
    "chosen_nll",
    "cpo_loss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "perturbation_steps",
    "perturbed_betas",
    "rdpo_loss",
    "rrhf_loss",
    "simpo_loss",
    "slic_loss",
]


class PreferenceLoss(NamedTuple):
    """Per-pair outputs of a preference loss, each of shape (B,)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class TwoTermLoss(NamedTuple):
    """Per-pair outputs of a loss with an NLL term (ORPO, CPO, SLiC-HF, RRHF), each of shape (B,): those of
    :class:`PreferenceLoss`, then the preference term as it enters ``losses`` and the chosen response's unweighted
    mean NLL −log π_θ(y_w|x)/|y_w| (both detached, for the logs)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    preference: Tensor
    nll: Tensor


class LossType(str, enum.Enum):
    """The preference objectives, with the capabilities the training loop needs to know about."""

    EPSILON_DPO = "epsilon_dpo"
    DPO = "dpo"
    CDPO = "cdpo"
    IPO = "ipo"
    HINGE = "hinge"
    BETA_DPO = "beta_dpo"
    SIMPO = "simpo"
    ORPO = "orpo"
    CPO = "cpo"
    RDPO = "rdpo"
    KTO = "kto"
    SLIC = "slic"
    RRHF = "rrhf"

    def __str__(self) -> str:  # "dpo", in messages and model cards, on every Python version
        return self.value

    @property
    def needs_perturbation(self) -> bool:
        """Whether the loss needs the ε-perturbed log-probs (and so the reference's full logits)."""
        return self is LossType.EPSILON_DPO

    @property
    def uses_label_smoothing(self) -> bool:
        """Whether ``label_smoothing`` has a meaning for this loss (cDPO's conservative targets; SimPO and CPO take
        the same form on their own logits, as TRL's CPOTrainer does)."""
        return self in (LossType.EPSILON_DPO, LossType.DPO, LossType.CDPO, LossType.SIMPO, LossType.CPO)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy with a reference model. The reference-free losses (SimPO, ORPO, CPO,
        SLiC-HF, RRHF) train with no reference model loaded and no reference log-probs computed."""
        return self not in REFERENCE_FREE

    @property
    def needs_mismatched_pairs(self) -> bool:
        """Whether the loss also runs the models on mismatched prompt–completion pairs (KTO's reference point)."""
        return self is LossType.KTO

    @property
    def has_nll_term(self) -> bool:
        """Whether the loss itself contains an NLL term on the chosen response (ORPO, CPO, SLiC-HF, RRHF)."""
        return self in (LossType.ORPO, LossType.CPO, LossType.SLIC, LossType.RRHF)

    @property
    def uses_beta(self) -> bool:
        """Whether ``beta`` enters the loss (SLiC-HF and RRHF have no β; ORPO's β is its λ, as in TRL)."""
        return self not in (LossType.SLIC, LossType.RRHF)

    @property
    def default_beta(self) -> float:
        """β when the config leaves it unset: SimPO's 2.0 (its official code's default; the paper uses 2.0–2.5,
        10 for Llama-3-Instruct v0.2), ORPO's λ = 0.1, and 0.1 for the others (DPO's customary value)."""
        return 2.0 if self is LossType.SIMPO else 0.1

    @property
    def has_batch_beta(self) -> bool:
        """Whether β is recomputed for every batch from margin statistics (β-DPO)."""
        return self is LossType.BETA_DPO


#: the losses that need no reference model
REFERENCE_FREE = frozenset({LossType.SIMPO, LossType.ORPO, LossType.CPO, LossType.SLIC, LossType.RRHF})


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


# ---- the baselines of the ε-DPO paper's comparison (docs/methods/) -------------------------------------------------


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """log π(y|x) / |y|: the mean log-prob per completion token (a sequence with no token counts as one)."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


def _conservative_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ℓ) log σ(u) − ℓ log σ(−u): the logistic loss, conservative with ℓ > 0 (as in :func:`dpo_loss`)."""
    _check_label_smoothing(label_smoothing)
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """The chosen response's mean negative log-likelihood per token, −log π_θ(y_w|x) / |y_w|, (B,).

    The NLL term of ORPO, CPO, SLiC-HF, RRHF and RPO (``rpo_alpha``): each paper's SFT term on y_w, a cross-entropy
    averaged over the response's tokens; here averaged per sequence, so every pair weighs the same whatever its
    length (TRL averages over all chosen tokens of the batch; the two agree when the lengths are equal).
    """
    return -_per_token(policy_chosen_logps, chosen_lengths)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate on both sides of −log 2 (Mächler 2012): log(−expm1(x)) near 0, log1p(−eˣ)
    below. Each branch is evaluated on inputs clamped to its own side, so the unused one never makes a NaN gradient."""
    cut = -math.log(2.0)
    near = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near, far)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): a reference-free reward, the length-normalised log-likelihood.

    r(y) = β/|y| · log π_θ(y|x);   loss = −log σ(r(y_w) − r(y_l) − γ)   (conservative with ``label_smoothing``).

    ``gamma`` γ is the target reward margin (TRL's ``simpo_gamma``; the paper quotes γ/β). Rewards are r(y).
    """
    chosen = beta * _per_token(policy_chosen_logps, chosen_lengths)
    rejected = beta * _per_token(policy_rejected_logps, rejected_lengths)
    losses = _conservative_sigmoid(chosen - rejected - gamma, label_smoothing)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, arXiv 2403.07691): SFT on the chosen plus an odds-ratio preference term.

    With P(y|x) = exp(log π_θ(y|x) / |y|) (the length-normalised likelihood) and odds(y) = P / (1 − P):

        loss = −log π_θ(y_w|x)/|y_w|  +  λ · −log σ(log odds(y_w) − log odds(y_l)).

    ``beta`` is λ (TRL's ORPOConfig names it ``beta``; the paper's default 0.1). Rewards are λ · log odds(y).
    """
    mean_chosen = _per_token(policy_chosen_logps, chosen_lengths)
    mean_rejected = _per_token(policy_rejected_logps, rejected_lengths)
    odds_chosen = mean_chosen - _log1mexp(mean_chosen)  # log odds(y_w) = log P − log(1 − P)
    odds_rejected = mean_rejected - _log1mexp(mean_rejected)
    preference = beta * -F.logsigmoid(odds_chosen - odds_rejected)
    nll = -mean_chosen
    return TwoTermLoss(
        nll + preference,
        (beta * odds_chosen).detach(),
        (beta * odds_rejected).detach(),
        preference.detach(),
        nll.detach(),
    )


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """CPO (Xu et al. 2024, arXiv 2401.08417): DPO's logistic loss with the reference dropped, plus SFT on y_w.

    loss = −log σ(β log π_θ(y_w|x) − β log π_θ(y_l|x))  +  α · (−log π_θ(y_w|x)/|y_w|).

    ``alpha`` is TRL's ``cpo_alpha`` (1 in the paper). Rewards are β log π_θ(y|x), as in TRL.
    """
    chosen, rejected = beta * policy_chosen_logps, beta * policy_rejected_logps
    preference = _conservative_sigmoid(chosen - rejected, label_smoothing)
    nll = chosen_nll(policy_chosen_logps, chosen_lengths)
    return TwoTermLoss(preference + alpha * nll, chosen.detach(), rejected.detach(), preference.detach(), nll.detach())


def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    alpha: float,
) -> PreferenceLoss:
    """R-DPO (Park et al. 2024, arXiv 2403.19159): DPO with a length term in the logit.

    loss = −log σ(β h + α (|y_w| − |y_l|)),   h = z − γ the DPO margin.

    The term comes from a length penalty α|y| in the RLHF objective: the reward it implies is
    r(y) = β log π_θ(y|x)/π_ref(y|x) + α|y|, so a longer chosen response already explains part of the preference
    and is pushed up less. Rewards are that r(y).
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps) + alpha * chosen_lengths.to(policy_chosen_logps.dtype)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps) + alpha * rejected_lengths.to(
        policy_rejected_logps.dtype
    )
    losses = -F.logsigmoid(chosen - rejected)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def kto_reference_point(mismatched_policy_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, arXiv 2402.01306): an estimate of KL(π_θ ‖ π_ref) from
    mismatched prompt–completion pairs (x_i, y_j), j ≠ i, as the mean of log π_θ(y_j|x_i) − log π_ref(y_j|x_i),
    detached and clamped at 0 (a KL is not negative). A scalar tensor."""
    return (mismatched_policy_logps.detach() - mismatched_ref_logps).mean().clamp(min=0.0)


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    reference_point: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on paired data: each pair gives one desirable (x, y_w) and one undesirable (x, y_l) example.

    With r(y) = log π_θ(y|x) − log π_ref(y|x) and z₀ from :func:`kto_reference_point`:

        loss = ½ [λ_D (1 − σ(β (r(y_w) − z₀))) + λ_U (1 − σ(β (z₀ − r(y_l))))]

    (the mean over the pair's two examples, so the batch mean equals KTO's mean over examples). The pair's two
    responses are never compared with each other: each is compared with z₀. ``desirable_weight`` λ_D and
    ``undesirable_weight`` λ_U as TRL names them (1 and 1; the paper asks λ_D n_D / λ_U n_U ∈ [1, 4/3], and paired
    data has n_D = n_U). Rewards are β r(y), as in TRL.

    How this differs from KTO on unpaired data (the paper's setting, TRL's KTOTrainer): there, every example is one
    (x, y) with a binary label, desirable and undesirable examples come from different prompts in any proportion
    (hence λ_D, λ_U), and z₀ comes from each example's prompt with another example's completion. Here every prompt
    brings exactly one desirable and one undesirable completion, the batch is balanced by construction, and z₀ comes
    from pair i's prompt with *both* completions of pair i + 1 (2B mismatched sequences per micro-batch, averaged
    over every process; the models run on them without gradient). What is lost against DPO is the pairing itself:
    KTO never uses that y_w and y_l answer the same prompt.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    desirable = 1.0 - torch.sigmoid(beta * (chosen - reference_point))
    undesirable = 1.0 - torch.sigmoid(beta * (reference_point - rejected))
    losses = 0.5 * (desirable_weight * desirable + undesirable_weight * undesirable)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    delta: float = 1.0,
    lam: float = 0.1,
) -> PreferenceLoss:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425): a calibration hinge on the sequence log-likelihoods plus a
    regularising NLL on the chosen response (the paper regularises toward the SFT target; with preference pairs,
    y_w, as in the SimPO paper's comparison).

    loss = max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x))  +  λ · (−log π_θ(y_w|x)/|y_w|).

    Rewards are the sequence log-likelihoods log π_θ(y|x).
    """
    preference = torch.relu(delta - (policy_chosen_logps - policy_rejected_logps))
    nll = chosen_nll(policy_chosen_logps, chosen_lengths)
    return TwoTermLoss(
        preference + lam * nll,
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
        preference.detach(),
        nll.detach(),
    )


def rrhf_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    lam: float = 1.0,
) -> PreferenceLoss:
    """RRHF (Yuan et al. 2023, arXiv 2304.05302) on pairs: a ranking hinge on length-normalised log-likelihoods
    p(y) = log π_θ(y|x)/|y| plus SFT on the better response.

    loss = max(0, p(y_l) − p(y_w))  +  λ · (−p(y_w))      (the paper: λ = 1, L = L_rank + L_ft).

    Rewards are p(y).
    """
    chosen = _per_token(policy_chosen_logps, chosen_lengths)
    rejected = _per_token(policy_rejected_logps, rejected_lengths)
    preference = torch.relu(rejected - chosen)
    nll = -chosen
    return TwoTermLoss(preference + lam * nll, chosen.detach(), rejected.detach(), preference.detach(), nll.detach())
