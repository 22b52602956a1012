"""The baselines of the ε-DPO paper's comparison (losses.py): hand-worked values, gradients against autograd of the
formulas as the papers write them, and the same loss as TRL's own code where TRL has the method."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from epsdpo.logps import PerturbedLogps
from epsdpo.losses import (
    LossType,
    TwoTermLoss,
    chosen_nll,
    cpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    rdpo_loss,
    rrhf_loss,
    simpo_loss,
    slic_loss,
)
from epsdpo.training.config import LossConfig
from epsdpo.training.pair_loss import compute_pair_losses, pair_metric_sums


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# One pair used by most hand-worked cases: log π_θ(y_w) = −4 over 2 tokens, log π_θ(y_l) = −9 over 3 tokens,
# log π_ref(y_w) = −5, log π_ref(y_l) = −7.
PC, PR, RC, RR = t(-4.0), t(-9.0), t(-5.0), t(-7.0)
LC, LR = t(2.0), t(3.0)


def test_simpo_hand_worked():
    # r_w = β/|y_w| log π = 2 · (−4/2) = −4;  r_l = 2 · (−9/3) = −6;  logit = −4 − (−6) − γ = 2 − 1 = 1
    # loss = −log σ(1) = log(1 + e⁻¹) = 0.31326168751822286
    out = simpo_loss(PC, PR, LC, LR, beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-4.0, -6.0)
    # conservative (ℓ = 0.1): 0.9 log(1 + e⁻¹) + 0.1 log(1 + e) = log(1 + e⁻¹) + 0.1 (as log(1 + e) = 1 + log(1 + e⁻¹))
    smoothed = simpo_loss(PC, PR, LC, LR, beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.41326168751822286, abs=1e-12)


def test_orpo_hand_worked():
    # P(y_w) = exp(mean log-prob) = 0.5 → odds 1 → log odds 0;  P(y_l) = 0.2 → odds 0.25 → log odds −log 4
    # preference = λ · −log σ(0 + log 4) = 0.1 · log(1 + 1/4) = 0.1 · 0.22314355131420976
    # NLL = −log 0.5 = 0.6931471805599453;  loss = 0.6931471805599453 + 0.022314355131420976 = 0.7154615356913663
    pc, pr = 2 * t(math.log(0.5)), 3 * t(math.log(0.2))
    out = orpo_loss(pc, pr, LC, LR, beta=0.1)
    assert isinstance(out, TwoTermLoss)
    assert out.losses.item() == pytest.approx(0.7154615356913663, abs=1e-12)
    assert out.preference.item() == pytest.approx(0.022314355131420976, abs=1e-12)
    assert out.nll.item() == pytest.approx(0.6931471805599453, abs=1e-12)
    # rewards λ · log odds: 0 and −0.1 · log 4 = −0.13862943611198905
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.13862943611198905, abs=1e-12)


def test_cpo_hand_worked():
    # logit = β (log π(y_w) − log π(y_l)) = 0.1 · 5 = 0.5;  preference = log(1 + e^−0.5) = 0.47407698418010663
    # NLL = 4 / 2 = 2;  loss = 0.47407698418010663 + 1 · 2
    out = cpo_loss(PC, PR, LC, beta=0.1, alpha=1.0)
    assert out.losses.item() == pytest.approx(2.4740769841801066, abs=1e-12)
    assert out.preference.item() == pytest.approx(0.47407698418010663, abs=1e-12) and out.nll.item() == 2.0
    assert out.chosen_rewards.item() == pytest.approx(-0.4) and out.rejected_rewards.item() == pytest.approx(-0.9)
    assert cpo_loss(PC, PR, LC, beta=0.1, alpha=0.0).losses.item() == pytest.approx(0.47407698418010663, abs=1e-12)


def test_rdpo_hand_worked():
    # h = (−4 − (−5)) − (−9 − (−7)) = 1 + 2 = 3;  β h = 0.5 · 3 = 1.5;  α (|y_w| − |y_l|) = 0.5 · (2 − 5) = −1.5
    # logit = 0 → loss = log 2;  rewards: 0.5 · 1 + 0.5 · 2 = 1.5 and 0.5 · (−2) + 0.5 · 5 = 1.5
    out = rdpo_loss(PC, PR, RC, RR, LC, t(5.0), beta=0.5, alpha=0.5)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-12)
    assert out.chosen_rewards.item() == 1.5 and out.rejected_rewards.item() == 1.5
    # α = 0 is DPO: −log σ(1.5) = log(1 + e^−1.5) = 0.20141327798275246
    assert rdpo_loss(PC, PR, RC, RR, LC, t(5.0), 0.5, 0.0).losses.item() == pytest.approx(0.20141327798275246)


def test_kto_reference_point_is_the_clamped_mean_mismatched_log_ratio():
    # mismatched log π_θ − log π_ref: (−3 + 4, −6 + 6.5) = (1, 0.5) → mean 0.75;  (−1, 0.5) → mean −0.25 → 0
    assert kto_reference_point(t(-3.0, -6.0), t(-4.0, -6.5)).item() == 0.75
    assert kto_reference_point(t(-5.0, -6.0), t(-4.0, -6.5)).item() == 0.0
    policy = t(-3.0, -6.0).requires_grad_()
    assert not kto_reference_point(policy, t(-4.0, -6.5)).requires_grad  # detached


def test_kto_hand_worked():
    # r_w = −4 + 5 = 1, r_l = −9 + 7 = −2, z₀ = 0.75, β = 2
    # desirable: 1 − σ(2 (1 − 0.75)) = σ(−0.5) = 1 / (1 + e^0.5) = 0.3775406687981454
    # undesirable: 1 − σ(2 (0.75 + 2)) = σ(−5.5) = 1 / (1 + e^5.5) = 0.004070137715896128
    # loss = ½ (0.3775406687981454 + 0.004070137715896128) = 0.19080540325702076
    out = kto_loss(PC, PR, RC, RR, torch.tensor(0.75, dtype=torch.float64), beta=2.0)
    assert out.losses.item() == pytest.approx(0.19080540325702076, abs=1e-12)
    assert out.chosen_rewards.item() == 2.0 and out.rejected_rewards.item() == -4.0
    # λ_D = 2, λ_U = 0: ½ · 2 · 0.3775406687981454
    weighted = kto_loss(PC, PR, RC, RR, 0.75, 2.0, desirable_weight=2.0, undesirable_weight=0.0)
    assert weighted.losses.item() == pytest.approx(0.3775406687981454, abs=1e-12)


def test_slic_hand_worked():
    # pair 1: δ − (−4 + 9) = 1 − 5 < 0 → hinge 0;  NLL 4 / 2 = 2;  loss = 0 + 0.5 · 2 = 1
    # pair 2: δ − (−6 + 5.5) = 1.5 → hinge 1.5;  NLL 6 / 3 = 2;  loss = 1.5 + 0.5 · 2 = 2.5
    out = slic_loss(t(-4.0, -6.0), t(-9.0, -5.5), t(2.0, 3.0), delta=1.0, lam=0.5)
    assert out.losses.tolist() == [1.0, 2.5] and out.preference.tolist() == [0.0, 1.5] and out.nll.tolist() == [2, 2]
    assert out.chosen_rewards.tolist() == [-4.0, -6.0]


def test_rrhf_hand_worked():
    # pair 1: p_w = −4/2 = −2, p_l = −9/3 = −3 → max(0, −3 + 2) = 0;  NLL 2;  loss 2
    # pair 2: p_w = −6/2 = −3, p_l = −5/2 = −2.5 → max(0, −2.5 + 3) = 0.5;  NLL 3;  loss 3.5
    out = rrhf_loss(t(-4.0, -6.0), t(-9.0, -5.0), t(2.0, 2.0), t(3.0, 2.0), lam=1.0)
    assert out.losses.tolist() == [2.0, 3.5] and out.preference.tolist() == [0.0, 0.5]
    assert out.chosen_rewards.tolist() == [-2.0, -3.0] and out.rejected_rewards.tolist() == [-3.0, -2.5]


def test_chosen_nll_is_the_mean_per_token():
    assert chosen_nll(t(-6.0, -1.0), t(3.0, 0.0)).tolist() == [2.0, 1.0]  # an empty completion counts as 1 token


# ---- gradients: each loss against autograd of its formula as the paper writes it --------------------------------

B = 6


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, B), generator=g).to(torch.float64)
    # log-probs of about −1.5 nats per token, so ORPO's probabilities stay well inside (0, 1)
    logps = -lengths * (0.5 + 2 * torch.rand(2, B, generator=g, dtype=torch.float64))
    ref = logps + torch.randn(2, B, generator=g, dtype=torch.float64)
    return {"pc": logps[0], "pr": logps[1], "rc": ref[0], "rr": ref[1], "lc": lengths[0], "lr": lengths[1]}


def _sig(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


# (name, the function under test, the formula transcribed from the paper), each mapping the inputs to (B,) losses
FORMULAS = {
    "simpo": (
        lambda x: simpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], beta=2.5, gamma=1.375).losses,
        lambda x: -torch.log(_sig(2.5 / x["lc"] * x["pc"] - 2.5 / x["lr"] * x["pr"] - 1.375)),
    ),
    "orpo": (
        lambda x: orpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], beta=0.2).losses,
        lambda x: (
            -x["pc"] / x["lc"]
            - 0.2
            * torch.log(
                _sig(
                    torch.log(torch.exp(x["pc"] / x["lc"]) / (1 - torch.exp(x["pc"] / x["lc"])))
                    - torch.log(torch.exp(x["pr"] / x["lr"]) / (1 - torch.exp(x["pr"] / x["lr"])))
                )
            )
        ),
    ),
    "cpo": (
        lambda x: cpo_loss(x["pc"], x["pr"], x["lc"], beta=0.1, alpha=0.7).losses,
        lambda x: -torch.log(_sig(0.1 * x["pc"] - 0.1 * x["pr"])) - 0.7 * x["pc"] / x["lc"],
    ),
    "rdpo": (
        lambda x: rdpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], x["lc"], x["lr"], beta=0.1, alpha=0.02).losses,
        lambda x: (
            -torch.log(
                _sig(
                    0.1 * torch.log(torch.exp(x["pc"]) / torch.exp(x["rc"]))
                    - 0.1 * torch.log(torch.exp(x["pr"]) / torch.exp(x["rr"]))
                    + (0.02 * x["lc"] - 0.02 * x["lr"])
                )
            )
        ),
    ),
    "kto": (
        lambda x: kto_loss(x["pc"], x["pr"], x["rc"], x["rr"], 0.3, beta=0.5, desirable_weight=1.2).losses,
        lambda x: (
            ((1.2 - 1.2 * _sig(0.5 * ((x["pc"] - x["rc"]) - 0.3))) + (1 - _sig(0.5 * (0.3 - (x["pr"] - x["rr"]))))) / 2
        ),
    ),
    "slic": (
        lambda x: slic_loss(x["pc"], x["pr"], x["lc"], delta=8.0, lam=0.3).losses,
        lambda x: torch.clamp(8.0 - x["pc"] + x["pr"], min=0) - 0.3 * x["pc"] / x["lc"],
    ),
    "rrhf": (
        lambda x: rrhf_loss(x["pc"], x["pr"], x["lc"], x["lr"], lam=1.0).losses,
        lambda x: torch.clamp(x["pr"] / x["lr"] - x["pc"] / x["lc"], min=0) - x["pc"] / x["lc"],
    ),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_autograd_of_the_formula(name, seed):
    ours, formula = FORMULAS[name]
    x = _inputs(seed)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)  # a non-uniform upstream gradient
    grads = []
    for fn in (ours, formula):
        leaves = {k: v.clone().requires_grad_(k in ("pc", "pr")) for k, v in x.items()}
        value = fn(leaves)
        grads.append((value.detach(), *torch.autograd.grad((value * weights).sum(), (leaves["pc"], leaves["pr"]))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the hinges' kinks aside, finite differences agree too
    assert torch.autograd.gradcheck(
        lambda pc, pr: ours({**x, "pc": pc, "pr": pr}),
        (x["pc"].clone().requires_grad_(), x["pr"].clone().requires_grad_()),
    )


def test_orpo_stays_finite_where_the_likelihood_is_near_one():
    # mean log-probs of −1e-6 (P ≈ 1) and −30: both branches of log(1 − eˣ) are exercised and no gradient is NaN
    pc = torch.tensor([-1e-6, -30.0], dtype=torch.float64, requires_grad=True)
    out = orpo_loss(pc, torch.tensor([-40.0, -1e-6], dtype=torch.float64), t(1.0, 1.0), t(1.0, 1.0), beta=0.1)
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()


# ---- the same loss as TRL's code on the same batch ------------------------------------------------------------------


def _trl_self(**fields):
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), alpha=0.0, label_smoothing=0.0, **fields)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_and_cpo_equal_trl_cpo_trainer(label_smoothing):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    x = _inputs(3)
    # TRL's SimPO: CPOTrainer with loss_type="simpo" on mean log-probs (average_log_prob=True for simpo)
    trl = _trl_self(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    trl.label_smoothing = label_smoothing
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl, x["pc"] / x["lc"], x["pr"] / x["lr"])
    ours = simpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], 2.0, 0.5, label_smoothing)
    torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((ours.chosen_rewards, ours.rejected_rewards), (chosen, rejected))
    # TRL's CPO: the sigmoid loss on summed log-probs; its NLL term (cpo_alpha) is computed apart and added
    trl = _trl_self(loss_type="sigmoid", beta=0.1)
    trl.label_smoothing = label_smoothing
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl, x["pc"], x["pr"])
    ours = cpo_loss(x["pc"], x["pr"], x["lc"], 0.1, alpha=1.0, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.preference, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((ours.chosen_rewards, ours.rejected_rewards), (chosen, rejected))


def test_orpo_equals_trl_orpo_trainer():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    x = _inputs(4)
    # TRL: losses = λ log σ(log odds ratio) on mean log-probs, and loss = NLL − mean(losses)
    losses, *_ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.1), x["pc"] / x["lc"], x["pr"] / x["lr"])
    ours = orpo_loss(x["pc"], x["pr"], x["lc"], x["lr"], beta=0.1)
    torch.testing.assert_close(ours.preference, -losses.to(torch.float64), rtol=1e-6, atol=1e-7)  # TRL: float32


# ---- through compute_pair_losses: the dispatch, rpo_alpha and the metrics -------------------------------------------


def _logps(pc, pr, rc=None, rr=None) -> PerturbedLogps:
    policy = torch.cat([pc, pr]).float()
    if rc is None:
        return PerturbedLogps.policy_only(policy)
    reference = torch.cat([rc, rr]).float()
    return PerturbedLogps(policy, reference, policy, policy, policy)


def test_rpo_alpha_adds_the_chosen_mean_nll_to_dpo():
    # DPO: β h = 0.5 · 3 = 1.5 → log(1 + e^−1.5) = 0.20141327798275246;  NLL 4/2 = 2;  α = 1 → 2.20141327798275246
    logps, tokens = _logps(PC, PR, RC, RR), torch.tensor([2, 3])
    plain = compute_pair_losses(logps, tokens, LossConfig(loss_type="dpo", beta=0.5), beta=0.5)
    rpo = compute_pair_losses(logps, tokens, LossConfig(loss_type="dpo", beta=0.5, rpo_alpha=1.0), beta=0.5)
    assert plain.terms is None and "loss/nll" not in pair_metric_sums(plain)
    assert rpo.loss.losses.item() == pytest.approx(2.20141327798275246, abs=1e-6)
    sums = pair_metric_sums(rpo)
    assert sums["loss/preference"] == pytest.approx(0.20141327798275246, abs=1e-6) and sums["loss/nll"] == 2.0
    assert torch.equal(rpo.loss.chosen_rewards, plain.loss.chosen_rewards)  # the rewards are DPO's


@pytest.mark.parametrize("kind", ["simpo", "orpo", "cpo", "slic", "rrhf"])
def test_reference_free_losses_never_read_the_reference(kind):
    # the log-probs of a run without a reference carry NaN as its "reference": a loss reading it would be NaN
    logps = _logps(t(-4.0, -6.0), t(-9.0, -5.5))
    assert torch.isnan(logps.reference).all()
    result = compute_pair_losses(logps, torch.tensor([2, 3, 3, 2]), LossConfig(loss_type=kind), beta=0.1)
    sums = pair_metric_sums(result)
    assert torch.isfinite(result.loss.losses).all() and all(math.isfinite(v) for v in sums.values())
    assert "logps/ref_chosen" not in sums and "kl/pair_beta" not in sums
    assert ("loss/nll" in sums) == LossType(kind).has_nll_term


def test_simpo_through_compute_pair_losses_logs_its_own_rewards():
    # the hand-worked SimPO pair: rewards −4 and −6 (β/|y| log π), margin 2 > 0 → accuracy 1
    cfg = LossConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    result = compute_pair_losses(_logps(PC, PR), torch.tensor([2, 3]), cfg, beta=2.0)
    sums = pair_metric_sums(result)
    assert sums["loss"] == pytest.approx(0.31326168751822286, abs=1e-6)
    assert (sums["rewards/chosen"], sums["rewards/rejected"], sums["rewards/accuracies"]) == (-4.0, -6.0, 1.0)


def test_kto_through_compute_pair_losses_needs_and_logs_its_reference_point():
    cfg = LossConfig(loss_type="kto", beta=2.0)
    logps, tokens = _logps(PC, PR, RC, RR), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="reference point"):
        compute_pair_losses(logps, tokens, cfg, beta=2.0)
    result = compute_pair_losses(logps, tokens, cfg, beta=2.0, reference_point=torch.tensor(0.75))
    sums = pair_metric_sums(result)
    assert sums["loss"] == pytest.approx(0.19080540325702076, abs=1e-6) and sums["kto/reference_point"] == 0.75


def test_rdpo_through_compute_pair_losses_uses_the_completion_lengths():
    cfg = LossConfig(loss_type="rdpo", beta=0.5, rdpo_alpha=0.5)
    result = compute_pair_losses(_logps(PC, PR, RC, RR), torch.tensor([2, 5]), cfg, beta=0.5)
    assert result.loss.losses.item() == pytest.approx(math.log(2), abs=1e-6)  # the hand-worked R-DPO pair


def test_policy_only_logps_are_the_policy_and_nan():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    logps = PerturbedLogps.policy_only(policy)
    assert logps.policy is policy and torch.isnan(logps.reference).all()
    assert torch.equal(logps.weaker, policy.detach()) and not logps.decision_policy.requires_grad
