"""β-DPO's batch β and filtering, and TR-DPO's reference updates, against hand-worked values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from epsdpo.control import BetaDPOController
from epsdpo.losses import beta_dpo_loss, beta_dpo_weights, dpo_loss
from epsdpo.reference import fold_adapters_into_base, soft_update_reference


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


def test_beta_dpo_loss_averages_over_kept_pairs():
    pc, pr, rc, rr = t(-1, -2, -3, -4), t(-2, -2, -5, -1), t(-1, -1, -1, -1), t(-1, -1, -1, -1)
    keep = torch.tensor([True, False, True, True])
    out = beta_dpo_loss(pc, pr, rc, rr, keep=keep, beta=0.3)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.3).losses
    assert out.losses[1] == 0
    assert out.losses.sum() / 4 == pytest.approx(plain[keep].mean())


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


def test_soft_update_reference_formula():
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    soft_update_reference(policy, reference, 0.6)
    for name, value in reference.named_parameters():
        expected = 0.6 * dict(policy.named_parameters())[name] + 0.4 * before[name]
        torch.testing.assert_close(value, expected)
    soft_update_reference(policy, reference, 1.0)  # hard copy
    for a, b in zip(reference.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="alpha"):
        soft_update_reference(policy, reference, 0.0)


def test_fold_adapters_keeps_the_policy_and_moves_the_base_by_the_formula():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        policy_before = model(ids).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        base_before = layer.base_layer.weight.clone()
        adapted = base_before + layer.get_delta_weight("default")  # θ for this layer
    fold_adapters_into_base(model, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, policy_before, atol=1e-6, rtol=1e-5)  # the policy is unchanged
        # the reference (the base) moved to α θ + (1 − α) θ_ref
        torch.testing.assert_close(layer.base_layer.weight, 0.6 * adapted + 0.4 * base_before, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layer"):
        fold_adapters_into_base(nn.Linear(2, 2), 0.5)
