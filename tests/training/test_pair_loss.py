"""The loss dispatch (training/pair_loss.py) on hand-made log-probs: every loss type, with values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from epsdpo.logps import DecisionSpec, PerturbedLogps
from epsdpo.training.config import LossConfig
from epsdpo.training.pair_loss import compute_pair_losses, dpo_margins, pair_metric_sums


def logps(policy, reference, weaker=None, stronger=None) -> PerturbedLogps:
    """Rows 0..B−1 chosen, B..2B−1 rejected."""
    p, r = torch.tensor(policy, requires_grad=True), torch.tensor(reference)
    w = torch.tensor(weaker) if weaker is not None else p.detach().clone()
    s = torch.tensor(stronger) if stronger is not None else p.detach().clone()
    return PerturbedLogps(p, r, w, s, p.detach().clone())


def sigmoid_loss(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# two pairs: policy log-ratios (chosen − rejected) 1 and −2 against a reference with 0 and 0
TWO = dict(policy=[-1.0, -4.0, -2.0, -2.0], reference=[-3.0, -3.0, -3.0, -1.0])
TOKENS = torch.tensor([2, 4, 1, 4])


def test_dpo_hand_worked():
    lp = logps(**TWO)
    # margins h = (−1 − (−2)) − (−3 − (−3)) = 1 and (−4 − (−2)) − (−3 − (−1)) = 0
    assert dpo_margins(lp).tolist() == [1.0, 0.0]
    out = compute_pair_losses(lp, TOKENS, LossConfig(loss_type="dpo", beta=0.5), beta=0.5)
    assert out.loss.losses.tolist() == pytest.approx([sigmoid_loss(0.5), math.log(2.0)])
    assert out.steps is None and out.beta.tolist() == [0.5, 0.5]
    assert out.loss.chosen_rewards.tolist() == pytest.approx([0.5 * 2.0, 0.5 * -1.0])


def test_cdpo_smooths_the_label():
    out = compute_pair_losses(
        logps(**TWO), TOKENS, LossConfig(loss_type="cdpo", beta=1.0, label_smoothing=0.25), beta=1.0
    )
    expected = 0.75 * sigmoid_loss(1.0) + 0.25 * sigmoid_loss(-1.0)
    assert out.loss.losses[0].item() == pytest.approx(expected)


def test_ipo_normalises_by_completion_length():
    out = compute_pair_losses(logps(**TWO), TOKENS, LossConfig(loss_type="ipo", beta=0.1), beta=0.1)
    # pair 0: (−1/2 − (−2/1)) − (−3/2 − (−3/1)) = 1.5 − 1.5 = 0 → (0 − 1/(2β))² = 25
    assert out.loss.losses[0].item() == pytest.approx(25.0)


def test_hinge():
    out = compute_pair_losses(logps(**TWO), TOKENS, LossConfig(loss_type="hinge", beta=0.5), beta=0.5)
    assert out.loss.losses.tolist() == pytest.approx([max(0.0, 1 - 0.5), 1.0])


def test_epsilon_dpo_moves_beta_per_pair_from_the_decisions():
    # pair 0: the weaker policy raises its margin (z⁻ − z = +0.2), the stronger lowers it: s = +1, β̃ = β/(1+ε)
    # pair 1: no perturbed margin differs from z: s = 0, β̃ = β
    lp = logps(**TWO, weaker=[-0.9, -4.0, -2.1, -2.0], stronger=[-1.1, -4.0, -1.9, -2.0])
    cfg = LossConfig(loss_type="epsilon_dpo", beta=0.1, epsilon=0.1)
    out = compute_pair_losses(lp, TOKENS, cfg, beta=0.1, decision=cfg.decision_spec())
    assert out.steps.tolist() == [1, 0]
    assert out.beta.tolist() == pytest.approx([0.1 / 1.1, 0.1])
    assert out.loss.losses[0].item() == pytest.approx(sigmoid_loss(0.1 / 1.1 * 1.0))
    sums = pair_metric_sums(out)
    assert (sums["kl/steps_weaker"], sums["kl/steps_kept"], sums["kl/steps_stronger"]) == (1.0, 1.0, 0.0)


def test_epsilon_dpo_takes_its_arithmetic_from_the_spec_and_keeps_what_it_compared():
    lp = logps(**TWO, weaker=[-0.9, -4.0, -2.1, -2.0], stronger=[-1.1, -4.0, -1.9, -2.0])
    cfg = LossConfig(loss_type="epsilon_dpo", beta=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="needs the run's DecisionSpec"):
        compute_pair_losses(lp, TOKENS, cfg, beta=0.1)
    # the spec, not the config, decides: a dead band of 0.5 nats keeps pair 0 (gaps of 0.2)
    out = compute_pair_losses(lp, TOKENS, cfg, beta=0.1, decision=DecisionSpec(0.1, tolerance=0.5))
    assert out.steps.tolist() == [0, 0] and out.beta.tolist() == pytest.approx([0.1, 0.1])
    z, weaker, stronger = out.logratios  # chosen − rejected: what the decisions compared
    assert z.tolist() == [1.0, -2.0]
    assert weaker.tolist() == pytest.approx([1.2, -2.0]) and stronger.tolist() == pytest.approx([0.8, -2.0])


def test_beta_dpo_takes_its_batch_beta_and_kept_pairs_from_the_caller():
    cfg = LossConfig(loss_type="beta_dpo", beta=0.1)
    with pytest.raises(ValueError, match="needs the kept pairs"):
        compute_pair_losses(logps(**TWO), TOKENS, cfg, beta=0.2)
    keep = torch.tensor([True, False])
    out = compute_pair_losses(logps(**TWO), TOKENS, cfg, beta=0.2, keep=keep)
    # one of two kept: that pair's loss is doubled so that sum / B is the mean over kept pairs
    assert out.loss.losses.tolist() == pytest.approx([2 * sigmoid_loss(0.2), 0.0])
    # one process's slice of a global batch that kept 3 of 4: every process scales by 4/3
    shared = compute_pair_losses(logps(**TWO), TOKENS, cfg, beta=0.2, keep=keep, kept_share=0.75)
    assert shared.loss.losses[0].item() == pytest.approx(sigmoid_loss(0.2) / 0.75)
    assert pair_metric_sums(out)["kl/pairs_kept"] == 1.0


def test_only_the_policy_carries_gradient():
    lp = logps(**TWO)
    out = compute_pair_losses(lp, TOKENS, LossConfig(loss_type="dpo"), beta=0.1)
    out.loss.losses.sum().backward()
    assert lp.policy.grad is not None and lp.policy.grad.abs().sum() > 0
    assert not out.loss.chosen_rewards.requires_grad


def test_metric_sums_count_pairs_and_accuracy():
    sums = pair_metric_sums(compute_pair_losses(logps(**TWO), TOKENS, LossConfig(loss_type="dpo"), beta=0.1))
    assert sums["pairs"] == 2.0 and sums["rewards/accuracies"] == 1.0  # margins 0.1 and 0: one strictly positive
    assert sums["logps/chosen"] == pytest.approx(-5.0) and sums["logps/ref_rejected"] == pytest.approx(-4.0)
