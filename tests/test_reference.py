"""TR-DPO's reference updates (epsdpo/reference.py) against the formula."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from epsdpo.training.reference import fold_adapters_into_base, soft_update_reference


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
