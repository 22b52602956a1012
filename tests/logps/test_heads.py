"""The core pieces on a real (tiny, randomly initialised) transformers model, used as docs/epsilon_dpo.md shows."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epsdpo
from epsdpo import LMHeadInput, perturbed_logps


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def batch(pairs: int = 3, length: int = 12, seed: int = 0):
    """2B rows (chosen first), a shared prompt of 4 tokens, then the completions; labels shifted by one."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (2 * pairs, length), generator=g)
    input_ids[pairs:, :4] = input_ids[:pairs, :4]
    completion = torch.zeros_like(input_ids)
    completion[:, 4:] = 1
    completion[-1, 9:] = 0  # a shorter rejected completion (right padding)
    attention = torch.ones_like(input_ids)
    attention[-1, 9:] = 0
    return input_ids, attention, input_ids[:, 1:], completion[:, 1:]  # logits[:, :-1] score labels


def head_inputs(model: LlamaForCausalLM, input_ids, attention) -> LMHeadInput:
    hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
    return LMHeadInput(hidden, model.lm_head.weight, model.lm_head.bias)


@pytest.mark.parametrize("tie", [True, False])
def test_fused_path_matches_model_logits_with_gradients(tie):
    policy = tiny_llama(tie=tie)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    input_ids, attention, labels, mask = batch()
    logits = policy(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    ref_logits = reference(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    eager = perturbed_logps(logits, ref_logits, labels, mask, 0.01, impl="eager")
    eager_grads = torch.autograd.grad(eager.policy.sum(), list(policy.parameters()))
    fused = perturbed_logps(
        head_inputs(policy, input_ids, attention),
        head_inputs(reference, input_ids, attention),
        labels,
        mask,
        0.01,
        chunk_size=5,
    )
    fused_grads = torch.autograd.grad(fused.policy.sum(), list(policy.parameters()))
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    for (name, _), ge, gf in zip(policy.named_parameters(), eager_grads, fused_grads, strict=True):
        torch.testing.assert_close(gf, ge, atol=2e-5, rtol=1e-4, msg=name)


def test_documented_training_recipe_lowers_loss_and_moves_beta():
    policy = tiny_llama(seed=1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    controller = epsdpo.BetaController(beta=0.1, epsilon=0.01)
    micro_batches = [batch(seed=s) for s in range(2)]  # 2 micro-batches per optimizer step
    losses, betas = [], []
    for _ in range(6):
        total = 0.0
        for input_ids, attention, labels, mask in micro_batches:
            with torch.no_grad():
                ref = head_inputs(reference, input_ids, attention)
            out = perturbed_logps(head_inputs(policy, input_ids, attention), ref, labels, mask, controller.epsilon)
            b = input_ids.shape[0] // 2
            c, r = slice(0, b), slice(b, 2 * b)
            z = out.decision_policy[c] - out.decision_policy[r]
            steps = epsdpo.perturbation_steps(z, out.weaker[c] - out.weaker[r], out.stronger[c] - out.stronger[r])
            controller.observe(steps)
            loss = epsdpo.epsilon_dpo_loss(
                out.policy[c],
                out.policy[r],
                out.reference[c],
                out.reference[r],
                steps,
                beta=controller.beta,
                epsilon=controller.epsilon,
            ).losses.mean() / len(micro_batches)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        betas.append(controller.beta)
        controller.step()
        losses.append(total)
    assert losses[-1] < losses[0]
    # Once the policy separates chosen from rejected, pairs relax (s = +1) and β shrinks (SPEC §2).
    assert controller.beta < 0.1
    assert controller.last_fractions is not None and controller.last_fractions[0] > 0.5
    assert betas[0] == 0.1 and controller.num_updates == 6


@pytest.mark.slow
def test_fused_path_is_exact_under_fsdp2_sharding():
    """2 CPU processes, FSDP2 (fully_shard, gloo): values and gradients equal the unsharded model's."""
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(__file__).with_name("fsdp2_fused_check.py")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("match the unsharded model") == 2
