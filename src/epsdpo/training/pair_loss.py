"""One micro-batch's preference loss from its sequence log-probs: the dispatch over loss types, pure.

No model, no accelerator, no state: β-DPO's batch β and kept pairs are computed by the loop (from margins gathered
over processes, :class:`epsdpo.control.BetaDPOController`) and passed in; ε-DPO's decision arithmetic is the run's
:class:`~epsdpo.logps.DecisionSpec`, the same object the log-probs were computed with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from epsdpo.logps import DecisionLogratios, DecisionSpec, PerturbedLogps
from epsdpo.losses import (
    LossType,
    PreferenceLoss,
    TwoTermLoss,
    beta_dpo_loss,
    chosen_nll,
    cpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    perturbation_steps,
    perturbed_betas,
    rdpo_loss,
    rrhf_loss,
    simpo_loss,
    slic_loss,
)
from epsdpo.training.config import LossConfig


@dataclass
class MicroBatchResult:
    """What one micro-batch contributes: the per-pair loss output, decisions and log-probs (B,)."""

    loss: PreferenceLoss
    steps: Tensor | None  # ε-DPO decisions, None for other losses
    logps: PerturbedLogps
    beta: Tensor  # (B,) the β each pair used (ε-DPO: β̃ = β / (1 + ε s), the one its loss used)
    keep: Tensor | None = None  # β-DPO: the pairs kept by its filtering
    logratios: DecisionLogratios | None = None  # ε-DPO: the (z, z⁻, z⁺) its decisions compared
    has_reference: bool = True  # False for the reference-free losses: logps.reference is not a reference's
    terms: tuple[Tensor, Tensor] | None = None  # a loss with an NLL term: (preference term, chosen's mean NLL), (B,)
    reference_point: Tensor | None = None  # KTO: the z₀ its loss used (a scalar)


def dpo_margins(logps: PerturbedLogps) -> Tensor:
    """(B,) unscaled DPO margins (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)), detached: what
    β-DPO's statistics and filtering look at. Rows 0..B−1 are chosen, B..2B−1 rejected."""
    b = logps.policy.shape[0] // 2
    policy, reference = logps.policy.detach(), logps.reference
    return (policy[:b] - policy[b:]) - (reference[:b] - reference[b:])


def compute_pair_losses(
    logps: PerturbedLogps,
    completion_tokens: Tensor,
    cfg: LossConfig,
    beta: float,
    keep: Tensor | None = None,
    kept_share: float | None = None,
    *,
    decision: DecisionSpec | None = None,
    reference_point: Tensor | None = None,
) -> MicroBatchResult:
    """Per-pair losses from the sequence log-probs of 2B rows (0..B−1 chosen, B..2B−1 rejected).

    ``completion_tokens`` (2B,) counts each row's completion tokens (IPO's length normalisation). ``beta`` is the
    step's β (for β-DPO the batch's β); ``keep`` (B,) bool, β-DPO only: the pairs its filtering kept, and
    ``kept_share`` the share kept over the whole global batch (when ``keep`` is one process's slice of it).
    ``decision``, ε-DPO only: the run's :class:`DecisionSpec`, the one ``logps`` were computed with; ``cfg`` gives
    the loss type and its hyperparameters, never the decision arithmetic. ``reference_point``, KTO only: z₀ from
    :func:`~epsdpo.losses.kto_reference_point` over the global micro-batch's mismatched pairs (the loop computes
    it). The reference-free losses read ``logps.policy`` only. With ``rpo_alpha`` > 0 a reference-based loss gets
    α times the chosen response's mean NLL added (:func:`with_rpo`).

    ε-DPO (Lee et al. 2025): z, z⁻, z⁺ from :meth:`DecisionSpec.logratios`, s from
    :func:`~epsdpo.perturbation_steps` with τ, and the DPO loss at β̃ = β / (1 + ε s)
    (:func:`~epsdpo.epsilon_dpo_loss`, with β̃ computed once here for the loss, the logs and the decision records).
    """
    if cfg.kind in BASELINES:
        result = _baseline_losses(logps, completion_tokens, cfg, beta, reference_point)
    else:
        result = _dpo_family_losses(logps, completion_tokens, cfg, beta, keep, kept_share, decision)
    return with_rpo(result, completion_tokens, cfg.nll_weight)


#: the losses of the ε-DPO paper's comparison that :func:`_baseline_losses` computes
BASELINES = frozenset(
    {LossType.SIMPO, LossType.ORPO, LossType.CPO, LossType.SLIC, LossType.RRHF, LossType.RDPO, LossType.KTO}
)


def _dpo_family_losses(
    logps: PerturbedLogps,
    completion_tokens: Tensor,
    cfg: LossConfig,
    beta: float,
    keep: Tensor | None,
    kept_share: float | None,
    decision: DecisionSpec | None,
) -> MicroBatchResult:
    """ε-DPO, DPO, cDPO, IPO, hinge and β-DPO (see :func:`compute_pair_losses`)."""
    kind = cfg.kind
    b = logps.policy.shape[0] // 2
    c, r = slice(0, b), slice(b, 2 * b)
    policy, reference = logps.policy, logps.reference
    if kind is LossType.IPO:  # IPO regresses length-normalised log-ratios (Azar et al. 2023)
        lengths = completion_tokens.clamp(min=1).to(policy.dtype)
        policy, reference = policy / lengths, reference / lengths
    args = (policy[c], policy[r], reference[c], reference[r])  # each (B,)
    if kind is LossType.EPSILON_DPO:
        if decision is None:
            raise ValueError("loss_type=epsilon_dpo needs the run's DecisionSpec (decision=plan.decision)")
        logratios = decision.logratios(logps)  # z, z⁻, z⁺, each (B,)
        steps = perturbation_steps(*logratios, tolerance=decision.tolerance)
        pair_beta = perturbed_betas(beta, steps, decision.epsilon)  # β̃, (B,) float32
        loss = dpo_loss(*args, beta=pair_beta.to(policy.dtype), label_smoothing=cfg.label_smoothing)
        return MicroBatchResult(loss, steps, logps, pair_beta, logratios=logratios)
    pair_beta = torch.full((b,), beta, dtype=torch.float32, device=policy.device)
    if kind in (LossType.DPO, LossType.CDPO):
        loss = dpo_loss(*args, beta=beta, label_smoothing=cfg.label_smoothing)
    elif kind is LossType.BETA_DPO:
        if keep is None:
            raise ValueError("loss_type=beta_dpo needs the kept pairs (keep) from its BetaDPOController")
        return MicroBatchResult(
            beta_dpo_loss(*args, keep=keep, beta=beta, kept_share=kept_share), None, logps, pair_beta, keep
        )
    elif kind is LossType.IPO:
        loss = ipo_loss(*args, beta=beta)
    else:
        loss = hinge_loss(*args, beta=beta)
    return MicroBatchResult(loss, None, logps, pair_beta)


def _baseline_losses(
    logps: PerturbedLogps, completion_tokens: Tensor, cfg: LossConfig, beta: float, reference_point: Tensor | None
) -> MicroBatchResult:
    """The losses of the ε-DPO paper's comparison (SimPO, ORPO, CPO, SLiC-HF, RRHF, R-DPO, KTO), from the 2B rows."""
    kind = cfg.kind
    b = logps.policy.shape[0] // 2
    c, r = slice(0, b), slice(b, 2 * b)
    policy, lengths = logps.policy, completion_tokens.to(logps.policy.device)
    pair_beta = torch.full((b,), beta, dtype=torch.float32, device=policy.device)
    if kind is LossType.SIMPO:
        loss = simpo_loss(policy[c], policy[r], lengths[c], lengths[r], beta, cfg.simpo_gamma, cfg.label_smoothing)
    elif kind is LossType.ORPO:
        loss = orpo_loss(policy[c], policy[r], lengths[c], lengths[r], beta)
    elif kind is LossType.CPO:
        loss = cpo_loss(policy[c], policy[r], lengths[c], beta, cfg.cpo_alpha, cfg.label_smoothing)
    elif kind is LossType.SLIC:
        loss = slic_loss(policy[c], policy[r], lengths[c], cfg.slic_delta, cfg.slic_lambda)
    elif kind is LossType.RRHF:
        loss = rrhf_loss(policy[c], policy[r], lengths[c], lengths[r], cfg.rrhf_lambda)
    elif kind is LossType.RDPO:
        reference = logps.reference
        loss = rdpo_loss(policy[c], policy[r], reference[c], reference[r], lengths[c], lengths[r], beta, cfg.rdpo_alpha)
    elif kind is LossType.KTO:
        if reference_point is None:
            raise ValueError("loss_type=kto needs its reference point z₀ (reference_point=kto_reference_point(...))")
        reference = logps.reference
        loss = kto_loss(
            policy[c],
            policy[r],
            reference[c],
            reference[r],
            reference_point,
            beta,
            cfg.desirable_weight,
            cfg.undesirable_weight,
        )
        return MicroBatchResult(loss, None, logps, pair_beta, reference_point=reference_point.detach())
    else:
        raise ValueError(f"no baseline loss named {kind.value!r}")
    terms = (loss.preference, loss.nll) if isinstance(loss, TwoTermLoss) else None
    return MicroBatchResult(
        PreferenceLoss(*loss[:3]), None, logps, pair_beta, has_reference=kind.needs_reference, terms=terms
    )


def with_rpo(result: MicroBatchResult, completion_tokens: Tensor, alpha: float) -> MicroBatchResult:
    """``result`` with α · (−log π_θ(y_w|x)/|y_w|) added to every pair's loss (RPO, Pang et al. 2024, arXiv
    2404.19733; TRL's former ``rpo_alpha``), its preference term and NLL kept apart for the logs; α = 0: ``result``
    itself, untouched."""
    if alpha == 0:
        return result
    loss, b = result.loss, result.loss.losses.shape[0]
    nll = chosen_nll(result.logps.policy[:b], completion_tokens[:b].to(result.logps.policy.device))
    combined = PreferenceLoss(loss.losses + alpha * nll, loss.chosen_rewards, loss.rejected_rewards)
    return replace(result, loss=combined, terms=(loss.losses.detach(), nll.detach()))


#: the columns of :func:`decision_table` (and of ``decisions.jsonl``, after ``step``)
DECISION_COLUMNS = (
    "pair",
    "s",
    "z",
    "weaker_gap",
    "stronger_gap",
    "margin",
    "beta",
    "chosen_tokens",
    "rejected_tokens",
)


def decision_table(result: MicroBatchResult, lengths: Tensor, pair_ids: Tensor) -> Tensor:
    """(B, len(DECISION_COLUMNS)) float64: every ε-DPO pair's decision and what it was made from, as ``result``'s
    loss used them (its log-ratios, decisions and β̃; nothing is recomputed).

    ``lengths`` (2B,) completion tokens per row; ``pair_ids`` (B,) the pairs' source rows.
    """
    if result.steps is None or result.logratios is None:
        raise ValueError("decision_table needs an ε-DPO result (its decisions and log-ratios)")
    b = pair_ids.shape[0]
    z, z_weaker, z_stronger = result.logratios
    margin = dpo_margins(result.logps)
    columns = (
        pair_ids.to(z.device),
        result.steps,
        z,
        z_weaker - z,
        z - z_stronger,
        margin,
        result.beta,
        lengths[:b],
        lengths[b:],
    )
    return torch.stack([c.detach().to(torch.float64) for c in columns], dim=1)


def pair_metric_sums(result: MicroBatchResult) -> dict[str, float]:
    """Sums over the micro-batch's pairs (divide by ``pairs`` after reducing across steps and processes)."""
    loss, logps = result.loss, result.logps
    b = loss.losses.shape[0]
    margins = loss.chosen_rewards - loss.rejected_rewards
    sums = {
        "pairs": float(b),
        "loss": float(loss.losses.detach().sum()),
        "rewards/chosen": float(loss.chosen_rewards.sum()),
        "rewards/rejected": float(loss.rejected_rewards.sum()),
        "rewards/margins": float(margins.sum()),
        "rewards/accuracies": float((margins > 0).sum()),
        "logps/chosen": float(logps.policy[:b].detach().sum()),
        "logps/rejected": float(logps.policy[b:].detach().sum()),
    }
    if result.has_reference:
        sums["logps/ref_chosen"] = float(logps.reference[:b].sum())
        sums["logps/ref_rejected"] = float(logps.reference[b:].sum())
        sums["kl/pair_beta"] = float(result.beta.sum())
    if result.terms is not None:  # the two terms of a loss with an NLL term
        sums["loss/preference"] = float(result.terms[0].sum())
        sums["loss/nll"] = float(result.terms[1].sum())
    if result.reference_point is not None:  # KTO: z₀ of the micro-batch, weighted by its pairs
        sums["kto/reference_point"] = float(result.reference_point) * b
    if result.keep is not None:
        sums["kl/pairs_kept"] = float(result.keep.sum())
    if result.steps is not None:
        sums["kl/steps_weaker"] = float((result.steps == 1).sum())
        sums["kl/steps_stronger"] = float((result.steps == -1).sum())
        sums["kl/steps_kept"] = float((result.steps == 0).sum())
    return sums


def pair_square_sums(result: MicroBatchResult) -> dict[str, float]:
    """Sums of squares over the micro-batch's pairs of the figures a held-out pass reports ± a standard error over
    pairs (:data:`epsdpo.training.metrics.WITH_SE`): the loss and the implicit reward margin (the accuracy is 0/1,
    its sum of squares is its sum)."""
    loss = result.loss
    margins = (loss.chosen_rewards - loss.rejected_rewards).double()
    return {
        "loss_sq": float(loss.losses.detach().double().square().sum()),
        "rewards/margins_sq": float(margins.square().sum()),
    }
