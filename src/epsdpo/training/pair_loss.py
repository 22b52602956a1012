"""One micro-batch's preference loss from its sequence log-probs: the dispatch over loss types, pure.

No model, no accelerator, no state: β-DPO's batch β and kept pairs are computed by the loop (from margins gathered
over processes, :class:`epsdpo.control.BetaDPOController`) and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from epsdpo.logps import PerturbedLogps
from epsdpo.losses import (
    LossType,
    PreferenceLoss,
    beta_dpo_loss,
    dpo_loss,
    epsilon_dpo_loss,
    hinge_loss,
    ipo_loss,
    perturbation_steps,
)
from epsdpo.training.config import LossConfig


@dataclass
class MicroBatchResult:
    """What one micro-batch contributes: the per-pair loss output, decisions and log-probs (B,)."""

    loss: PreferenceLoss
    steps: Tensor | None  # ε-DPO decisions, None for other losses
    logps: PerturbedLogps
    beta: Tensor  # (B,) the β each pair used
    keep: Tensor | None = None  # β-DPO: the pairs kept by its filtering


def dpo_margins(logps: PerturbedLogps) -> Tensor:
    """(B,) unscaled DPO margins (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)), detached: what
    β-DPO's statistics and filtering look at. Rows 0..B−1 are chosen, B..2B−1 rejected."""
    b = logps.policy.shape[0] // 2
    policy, reference = logps.policy.detach(), logps.reference
    return (policy[:b] - policy[b:]) - (reference[:b] - reference[b:])


def decision_logratios(logps: PerturbedLogps, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(z, z⁻, z⁺), each (B,): chosen − rejected of the decision-side log-probs; with ``decision_precision=
    published`` each difference is rounded to bf16, as the published trainer subtracts its bf16 sums."""
    b = logps.policy.shape[0] // 2
    out = tuple(x[:b] - x[b:] for x in (logps.decision_policy, logps.weaker, logps.stronger))
    if cfg.published_order:
        out = tuple(x.to(torch.bfloat16).float() for x in out)
    return out  # type: ignore[return-value]


def compute_pair_losses(
    logps: PerturbedLogps,
    completion_tokens: Tensor,
    cfg: LossConfig,
    beta: float,
    keep: Tensor | None = None,
    kept_share: float | None = None,
) -> MicroBatchResult:
    """Per-pair losses from the sequence log-probs of 2B rows (0..B−1 chosen, B..2B−1 rejected).

    ``completion_tokens`` (2B,) counts each row's completion tokens (IPO's length normalisation). ``beta`` is the
    step's β (for β-DPO the batch's β); ``keep`` (B,) bool, β-DPO only: the pairs its filtering kept, and
    ``kept_share`` the share kept over the whole global batch (when ``keep`` is one process's slice of it).
    """
    kind = cfg.kind
    b = logps.policy.shape[0] // 2
    c, r = slice(0, b), slice(b, 2 * b)
    policy, reference = logps.policy, logps.reference
    if kind is LossType.IPO:  # IPO regresses length-normalised log-ratios (Azar et al. 2023)
        lengths = completion_tokens.clamp(min=1).to(policy.dtype)
        policy, reference = policy / lengths, reference / lengths
    args = (policy[c], policy[r], reference[c], reference[r])  # each (B,)
    steps = None
    pair_beta = torch.full((b,), beta, dtype=torch.float32, device=policy.device)
    if kind is LossType.EPSILON_DPO:
        z, z_weaker, z_stronger = decision_logratios(logps, cfg)  # each (B,)
        steps = perturbation_steps(z, z_weaker, z_stronger, tolerance=cfg.decision_tolerance)
        loss = epsilon_dpo_loss(*args, steps, beta=beta, epsilon=cfg.epsilon, label_smoothing=cfg.label_smoothing)
        pair_beta = beta / (1.0 + cfg.epsilon * steps.to(torch.float32))
    elif kind in (LossType.DPO, LossType.CDPO):
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
    return MicroBatchResult(loss, steps, logps, pair_beta)


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


def decision_table(result: MicroBatchResult, lengths: Tensor, pair_ids: Tensor, cfg: LossConfig) -> Tensor:
    """(B, len(DECISION_COLUMNS)) float64: every ε-DPO pair's decision and what it was made from.

    ``lengths`` (2B,) completion tokens per row; ``pair_ids`` (B,) the pairs' source rows.
    """
    logps, b = result.logps, pair_ids.shape[0]
    z, z_weaker, z_stronger = decision_logratios(logps, cfg)
    margin = dpo_margins(logps)
    assert result.steps is not None
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
