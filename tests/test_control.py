"""BetaController: the global β update, unbiased short windows, cross-process reduction, checkpoint round-trip."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epsdpo import BetaController
from epsdpo.control import BetaDPOController
from epsdpo.losses import beta_dpo_weights


def s(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_one_step_hand_worked():
    c = BetaController(beta=0.1, epsilon=0.01)
    c.observe(s(1, 1, 0, -1))  # micro-batch 1
    c.observe(s(1, 1, 1, 0))  # micro-batch 2
    # mean s = (5 − 1) / 8 = 0.5  →  β = 0.1 / (1 + 0.01·0.5)
    assert c.step() == pytest.approx(0.1 / 1.005, rel=1e-12)
    assert c.beta == pytest.approx(0.1 / 1.005, rel=1e-12)
    assert c.last_fractions == pytest.approx((5 / 8, 2 / 8, 1 / 8))
    assert c.num_updates == 1 and c.pending_pairs == 0


def test_mean_beta_rule_hand_worked():
    c = BetaController(beta=0.1, epsilon=0.02, rule="mean_beta")
    c.observe(s(1, 0, -1, 1))
    expected = (0.1 / 1.02 + 0.1 + 0.1 / 0.98 + 0.1 / 1.02) / 4
    assert c.step() == pytest.approx(expected, rel=1e-12)


def test_rules_agree_to_second_order():
    for eps in (0.005, 0.01, 0.02):
        a, b = BetaController(0.1, eps), BetaController(0.1, eps, rule="mean_beta")
        for c in (a, b):
            c.observe(s(1, 1, 1, 0, -1))
            c.step()
        assert abs(a.beta - b.beta) / 0.1 < 2 * eps**2


def test_shorter_last_window_is_not_biased():
    """Accumulation of 4 micro-batches of 2 pairs, but the epoch ends after 1 micro-batch: mean over 2 pairs."""
    c = BetaController(beta=1.0, epsilon=0.1)
    c.observe(s(1, 1))
    assert c.step() == pytest.approx(1.0 / 1.1)  # not 1 / (1 + 0.1 · 2/8) as a full-count divisor would give


def test_several_steps_compose_and_an_empty_step_keeps_beta():
    c = BetaController(beta=0.5, epsilon=0.01)
    beta = 0.5
    for decisions in (s(1, 1), s(-1, -1, -1), s(0, 1, -1, 1)):
        c.observe(decisions)
        mean = decisions.float().mean().item()
        beta = beta / (1 + 0.01 * mean)
        assert c.step() == pytest.approx(beta, rel=1e-12)
    assert c.step() == pytest.approx(beta, rel=1e-12)  # nothing observed
    assert c.num_updates == 3


def test_state_dict_round_trip_mid_accumulation():
    a = BetaController(beta=0.1, epsilon=0.01)
    a.observe(s(1, 1, 1))
    a.step()
    a.observe(s(-1, 0))  # pending when the checkpoint is written
    state = a.state_dict()
    b = BetaController(beta=0.1, epsilon=0.01)
    b.load_state_dict(state)
    assert b.beta == a.beta and b.pending_pairs == 2 and b.num_updates == 1
    for c in (a, b):
        c.observe(s(1))
    assert a.step() == b.step()
    assert a.state_dict() == b.state_dict()


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    c = BetaController(beta=0.05, epsilon=0.02, rule="mean_beta")
    c.observe(s(1, -1, -1))
    c.step()
    path = tmp_path / "beta.pt"
    torch.save(c.state_dict(), path)
    d = BetaController(beta=0.05, epsilon=0.02, rule="mean_beta")
    d.load_state_dict(torch.load(path, weights_only=True))
    assert d.beta == c.beta and d.last_fractions == c.last_fractions


def test_load_state_dict_checks_settings():
    state = BetaController(beta=0.1, epsilon=0.01).state_dict()
    other = BetaController(beta=0.1, epsilon=0.02)
    with pytest.raises(ValueError, match="epsilon=0.01"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.epsilon == 0.02 and other.beta == 0.1
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"beta": 0.1})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta"):
        BetaController(beta=0.0, epsilon=0.01)
    with pytest.raises(ValueError, match="epsilon"):
        BetaController(beta=0.1, epsilon=1.0)
    with pytest.raises(ValueError, match="rule"):
        BetaController(beta=0.1, epsilon=0.01, rule="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1, 0 or"):
        BetaController(beta=0.1, epsilon=0.01).observe(torch.tensor([2]))


def test_custom_reduce_hook_sees_counts():
    seen = []

    def two_identical_processes(counts: torch.Tensor) -> torch.Tensor:
        seen.append(counts.tolist())
        return counts * 2

    c = BetaController(beta=0.1, epsilon=0.01, reduce_fn=two_identical_processes)
    c.observe(s(1, 0, -1, 1))
    c.step()
    assert seen == [[2.0, 1.0, 1.0]]
    assert c.last_num_pairs == 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        c = BetaController(beta=0.1, epsilon=0.01)
        # Rank 0 sees 3 pairs that relax, rank 1 sees 1 pair that tightens: global mean s = (3 − 1) / 4.
        c.observe(s(1, 1, 1) if rank == 0 else s(-1))
        results[rank] = (c.step(), c.last_fractions)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_reduce_decisions_over_gloo():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    mp.start_processes(_worker, args=(2, _free_port(), results), nprocs=2, start_method="spawn", join=True)
    expected = 0.1 / (1 + 0.01 * 0.5)
    for rank in (0, 1):
        beta, fractions = results[rank]
        assert beta == pytest.approx(expected, rel=1e-12)
        assert fractions == pytest.approx((0.75, 0.0, 0.25))


# ---- β-DPO's batch β and filtering (Wu et al. 2024) ----
def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_beta_dpo_hand_worked_two_batches_without_filtering():
    c = BetaDPOController(beta=0.1, alpha=0.6, rho=0.0, momentum=0.9)
    beta, keep = c.batch(t(1, 2, 3, 4))
    # first batch initialises M0 = 2.5, σ = std([1,2,3,4]) (unbiased) = 1.2910; kept mean = M0 → β = β0
    assert c.running_mean == pytest.approx(2.5) and c.running_std == pytest.approx(math.sqrt(5 / 3))
    assert beta == pytest.approx(0.1) and keep.all()
    beta, keep = c.batch(t(5, 5, 5, 5))
    # M0 = 0.9·2.5 + 0.1·5 = 2.75; σ = 0.9·1.2910 + 0.1·0; β = 0.1 (1 + 0.6 (5 − 2.75)) = 0.235
    assert c.running_mean == pytest.approx(2.75)
    assert c.running_std == pytest.approx(0.9 * math.sqrt(5 / 3))
    assert beta == pytest.approx(0.235) and c.last_beta == pytest.approx(0.235)


def test_beta_dpo_filters_the_outlier_and_sets_beta_from_the_kept_pairs():
    c = BetaDPOController(beta=0.1, alpha=0.6, rho=0.2, momentum=0.99)
    c.load_state_dict({**c.state_dict(), "running_mean": 0.0, "running_std": 0.1, "initialized": True})
    margins = t(0.0, 0.1, -0.1, 0.05, 100.0)
    torch.manual_seed(0)
    beta, keep = c.batch(margins)
    # M0 = 0.99·0 + 0.01·mean(M) = 0.2001; σ = 0.99·0.1 + 0.01·std(M); the outlier's weight is exp(−½·183²) = 0:
    # ⌊5 · 0.8⌋ = 4 pairs kept, and they are the other four, whatever the random draw.
    mean = margins.mean().item()
    std = margins.std().item()
    assert c.running_mean == pytest.approx(0.01 * mean, rel=1e-5)
    assert c.running_std == pytest.approx(0.99 * 0.1 + 0.01 * std, rel=1e-5)
    assert keep.tolist() == [True, True, True, True, False]
    kept_mean = (0.0 + 0.1 - 0.1 + 0.05) / 4
    assert beta == pytest.approx(0.1 * (1 + 0.6 * (kept_mean - 0.01 * mean)), rel=1e-5)


def test_beta_dpo_weights_and_clamp_and_eval():
    w = beta_dpo_weights(t(0.0, 1.0, 2.0), running_mean=0.0, running_std=1.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-2.0)])
    c = BetaDPOController(beta=0.1, alpha=10.0, rho=0.0)
    c.batch(t(0.0, 1.0))
    beta, _ = c.batch(t(-50.0, -50.0))  # 0.1 (1 + 10 (−50 − M0)) < 0 → clamped
    assert beta == 1e-3
    state = c.state_dict()
    beta_eval, keep = c.batch(t(-50.0, 3.0), train=False)  # evaluation neither filters nor moves the statistics
    assert (
        keep.all()
        and c.state_dict() == state
        and beta_eval == pytest.approx(max(1e-3, 0.1 * (1 + 10 * (-23.5 - state["running_mean"]))))
    )


def test_beta_dpo_state_round_trip_and_checks():
    a = BetaDPOController(beta=0.1)
    a.batch(t(1, 2, 3, 4, 5))
    b = BetaDPOController(beta=0.1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="rho"):
        BetaDPOController(beta=0.1, rho=0.3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rho"):
        BetaDPOController(beta=0.1, rho=1.0)


# ---- the controls: a frozen global β, bounds, a replayed schedule ----
def test_frozen_controller_counts_decisions_but_keeps_beta():
    c = BetaController(beta=0.1, epsilon=0.5, frozen=True)
    c.observe(s(1, 1, 1, -1))
    assert c.step() == 0.1 and c.last_fractions == (0.75, 0.0, 0.25)


def test_bounds_clamp_the_updated_beta():
    c = BetaController(beta=0.1, epsilon=0.5, beta_min=0.08)
    c.observe(s(1, 1))
    assert c.step() == 0.08  # 0.1 / 1.5 = 0.0667 is below the bound
    c = BetaController(beta=0.1, epsilon=0.5, beta_max=0.12)
    c.observe(s(-1, -1))
    assert c.step() == 0.12  # 0.1 / 0.5 = 0.2 is above it
