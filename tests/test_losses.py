"""Preference losses against values worked out by hand (SPEC §1–2)."""

from __future__ import annotations

import math

import pytest
import torch

from epsdpo import (
    LossType,
    dpo_loss,
    epsilon_dpo_loss,
    hinge_loss,
    ipo_loss,
    perturbation_steps,
    perturbed_betas,
)
from epsdpo.losses import beta_dpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Two pairs. Pair 0: policy margin z = -10 - (-14) = 4, reference γ = -12 - (-13) = 1, h = 3.
# Pair 1: z = -20 - (-18) = -2, γ = -19 - (-19) = 0, h = -2.
PC = torch.tensor([-10.0, -20.0])
PR = torch.tensor([-14.0, -18.0])
RC = torch.tensor([-12.0, -19.0])
RR = torch.tensor([-13.0, -19.0])
H = [3.0, -2.0]


def test_dpo_hand_values():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    expected = [-_log_sigmoid(0.5 * h) for h in H]  # 0.2014, 1.3133
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5 * 2.0, 0.5 * -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([0.5 * -1.0, 0.5 * 1.0])
    assert expected[0] == pytest.approx(0.2014133, rel=1e-6)


def test_cdpo_label_smoothing_pushes_against_the_label():
    ls = 0.1
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=ls)
    expected = [-(1 - ls) * _log_sigmoid(0.5 * h) - ls * _log_sigmoid(-0.5 * h) for h in H]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    # The sign matters: with the published code's sign the smoothed loss would *decrease* for a confident pair.
    plain = dpo_loss(PC, PR, RC, RR, beta=0.5).losses
    assert out.losses[0] > plain[0]
    # Gradient of the cDPO loss vanishes where σ(βh) = 1 − ℓ (the conservative target), not at h → ∞.
    h_star = math.log((1 - ls) / ls) / 0.5
    pc = torch.tensor([h_star], requires_grad=True)
    loss = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5, label_smoothing=ls).losses
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    assert abs(grad.item()) < 1e-6


@pytest.mark.parametrize("ls", [-0.1, 0.5, 1.0])
def test_label_smoothing_out_of_range(ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=ls)


def test_ipo_hand_values():
    out = ipo_loss(PC, PR, RC, RR, beta=0.25)  # target 1/(2β) = 2
    assert out.losses.tolist() == pytest.approx([(3 - 2) ** 2, (-2 - 2) ** 2])


def test_hinge_hand_values():
    out = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert out.losses.tolist() == pytest.approx([0.0, 1 + 1.0])  # max(0, 1 − 1.5), max(0, 1 + 1)


def test_perturbed_betas():
    steps = torch.tensor([1, 0, -1])
    assert perturbed_betas(0.1, steps, 0.01).tolist() == pytest.approx([0.1 / 1.01, 0.1, 0.1 / 0.99])
    with pytest.raises(ValueError, match="epsilon"):
        perturbed_betas(0.1, steps, 1.0)


def test_epsilon_dpo_uses_per_pair_beta():
    steps = torch.tensor([1, -1])
    out = epsilon_dpo_loss(PC, PR, RC, RR, steps, beta=0.5, epsilon=0.2)
    betas = [0.5 / 1.2, 0.5 / 0.8]
    expected = [-_log_sigmoid(b * h) for b, h in zip(betas, H, strict=True)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([betas[0] * 2.0, betas[1] * -1.0], rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([betas[0] * -1.0, betas[1] * 1.0], rel=1e-6)


def test_epsilon_dpo_with_label_smoothing():
    steps = torch.tensor([-1, 0])
    out = epsilon_dpo_loss(PC, PR, RC, RR, steps, beta=0.5, epsilon=0.1, label_smoothing=0.2)
    betas = [0.5 / 0.9, 0.5]
    expected = [-0.8 * _log_sigmoid(b * h) - 0.2 * _log_sigmoid(-b * h) for b, h in zip(betas, H, strict=True)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_epsilon_zero_is_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(16, generator=g) * 50 for _ in range(4)]
    steps = torch.randint(-1, 2, (16,), generator=g)
    for ls in (0.0, 0.1):
        eps = epsilon_dpo_loss(*args, steps, beta=0.1, epsilon=0.0, label_smoothing=ls)
        dpo = dpo_loss(*args, beta=0.1, label_smoothing=ls)
        for a, b in zip(eps, dpo, strict=True):
            assert torch.equal(a, b)
    # ... and so is ε > 0 when every decision is 0.
    zero = epsilon_dpo_loss(*args, torch.zeros(16, dtype=torch.long), beta=0.1, epsilon=0.05)
    assert torch.equal(zero.losses, dpo_loss(*args, beta=0.1).losses)


def test_epsilon_dpo_gradient_treats_beta_tilde_as_constant():
    pc = PC.clone().requires_grad_(True)
    steps = torch.tensor([1, -1])
    loss = epsilon_dpo_loss(pc, PR, RC, RR, steps, beta=0.5, epsilon=0.2).losses.sum()
    (grad,) = torch.autograd.grad(loss, pc)
    betas = torch.tensor([0.5 / 1.2, 0.5 / 0.8])
    # d/dh −log σ(β h) = −β σ(−β h)
    expected = -betas * torch.sigmoid(-betas * torch.tensor(H))
    torch.testing.assert_close(grad, expected)


def test_rewards_are_detached():
    pc = PC.clone().requires_grad_(True)
    out = dpo_loss(pc, PR, RC, RR, beta=0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_decisions_hand_cases():
    z = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    weaker = torch.tensor([1.5, 0.5, 1.5, 1.0, 0.5, 1.2])
    stronger = torch.tensor([0.5, 1.5, 1.5, 0.5, 0.5, 0.9])
    # monotone up → +1; monotone down → −1; both above → 0; a tie → 0; both below → 0; small gaps → +1
    assert perturbation_steps(z, weaker, stronger).tolist() == [1, -1, 0, 0, 0, 1]
    # A dead band of 0.15: the last pair's gaps are 0.2 and 0.1, so it no longer moves.
    assert perturbation_steps(z, weaker, stronger, tolerance=0.15).tolist() == [1, -1, 0, 0, 0, 0]
    assert perturbation_steps(z, weaker, stronger).dtype == torch.int64


def test_decisions_carry_no_gradient():
    z = torch.tensor([1.0], requires_grad=True)
    s = perturbation_steps(z, z + 1, z - 1)
    assert not s.requires_grad and s.tolist() == [1]
    with pytest.raises(ValueError, match="tolerance"):
        perturbation_steps(z, z, z, tolerance=-1.0)


def test_loss_type_capabilities():
    assert LossType("epsilon_dpo").needs_perturbation
    assert not any(LossType(n).needs_perturbation for n in ("dpo", "cdpo", "ipo", "hinge"))
    assert LossType.CDPO.uses_label_smoothing and not LossType.IPO.uses_label_smoothing


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_beta_dpo_loss_averages_over_kept_pairs():
    pc, pr, rc, rr = t(-1, -2, -3, -4), t(-2, -2, -5, -1), t(-1, -1, -1, -1), t(-1, -1, -1, -1)
    keep = torch.tensor([True, False, True, True])
    out = beta_dpo_loss(pc, pr, rc, rr, keep=keep, beta=0.3)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.3).losses
    assert out.losses[1] == 0
    assert out.losses.sum() / 4 == pytest.approx(plain[keep].mean())
