"""One micro-batch's preference loss from its sequence log-probs: the dispatch over loss types, pure.

No model, no accelerator, no state: β-DPO's batch β and kept pairs are computed by the loop (from margins gathered
over processes, :class:`epsdpo.control.BetaDPOController`) and passed in; ε-DPO's decision arithmetic is the run's
:class:`~epsdpo.logps.DecisionSpec`, the same object the log-probs were computed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from epsdpo.logps import DecisionLogratios, DecisionSpec, PerturbedLogps
from epsdpo.losses import (
    LossType,
    PreferenceLoss,
    beta_dpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    perturbation_steps,
    perturbed_betas,
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
) -> MicroBatchResult:
    """Per-pair losses from the sequence log-probs of 2B rows (0..B−1 chosen, B..2B−1 rejected).

    ``completion_tokens`` (2B,) counts each row's completion tokens (IPO's length normalisation). ``beta`` is the
    step's β (for β-DPO the batch's β); ``keep`` (B,) bool, β-DPO only: the pairs its filtering kept, and
    ``kept_share`` the share kept over the whole global batch (when ``keep`` is one process's slice of it).
    ``decision``, ε-DPO only: the run's :class:`DecisionSpec`, the one ``logps`` were computed with; ``cfg`` gives
    the loss type and label smoothing, never the decision arithmetic.

    ε-DPO (Lee et al. 2025): z, z⁻, z⁺ from :meth:`DecisionSpec.logratios`, s from
    :func:`~epsdpo.perturbation_steps` with τ, and the DPO loss at β̃ = β / (1 + ε s)
    (:func:`~epsdpo.epsilon_dpo_loss`, with β̃ computed once here for the loss, the logs and the decision records).
    """
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
        "logps/ref_chosen": float(logps.reference[:b].sum()),
        "logps/ref_rejected": float(logps.reference[b:].sum()),
        "kl/pair_beta": float(result.beta.sum()),
    }
    if result.keep is not None:
        sums["kl/pairs_kept"] = float(result.keep.sum())
    if result.steps is not None:
        sums["kl/steps_weaker"] = float((result.steps == 1).sum())
        sums["kl/steps_stronger"] = float((result.steps == -1).sum())
        sums["kl/steps_kept"] = float((result.steps == 0).sum())
    return sums
