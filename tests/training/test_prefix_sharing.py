"""Prefix sharing (one row per pair: prompt + chosen + rejected) against the unshared rows it replaces.

Tiny random Llama and Qwen2 models built from configs; pairs of odd lengths, one with an empty chosen response (an
all-prompt row); right and left padding; sdpa and eager attention; full fine-tuning, LoRA and the hidden-state
reference cache. Shared and unshared must give the same per-sequence log-probs to float32 rounding, the same ε-DPO
decisions on every pair, and the same loss and gradients to a tolerance; what cannot be masked falls back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from epsdpo.data import PreferenceCollator, TokenizedPair, shift_for_logps
from epsdpo.logps import LogpsOptions
from epsdpo.logps.heads import policy_logps, policy_only_logps, shared_prefix_mismatch, shared_prefix_problem
from epsdpo.training.config import LossConfig
from epsdpo.training.pair_loss import compute_pair_losses
from epsdpo.training.plan import CachedReference, LiveReference
from epsdpo.training.refcache import compute_reference_hidden

VOCAB = 97
PAD = 0
ROOT = Path(__file__).resolve().parents[2]


def tiny(kind: str, attention: str = "sdpa", seed: int = 0, **extra: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attention,
        **extra,
    )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    return Qwen2ForCausalLM(Qwen2Config(**shape))


def pairs(seed: int = 1) -> list[TokenizedPair]:
    """Odd lengths, a one-token prompt, a one-token response, and an empty chosen response (all prompt)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    lengths = [(5, 3, 7), (1, 6, 1), (9, 0, 4), (3, 5, 5)]  # (prompt, chosen, rejected)
    return [TokenizedPair(ids(p), ids(c), ids(r), None, None, i) for i, (p, c, r) in enumerate(lengths)]


def step_outputs(policy, reference, batch_pairs, *, shared: bool, padding: str = "right", epsilon: float = 0.5):
    """ε-DPO's per-sequence log-probs, decisions, losses and the policy's gradients, on shared or unshared rows."""
    collate = PreferenceCollator(PAD)
    batch = collate(batch_pairs)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels, mask = shift_for_logps(ids, batch["completion_mask"])
    rows = collate.shared_prefix(batch_pairs, ids.shape[1], padding) if shared else None
    cfg = LossConfig(loss_type="epsilon_dpo", beta=0.1, epsilon=epsilon)
    spec = cfg.decision_spec()
    policy.zero_grad(set_to_none=True)
    side = reference.side(policy, batch_pairs, ids, attention, mask, "train", rows)
    logps = policy_logps(policy, ids, attention, side, labels, mask, spec, LogpsOptions(), fused=True, shared=rows)
    result = compute_pair_losses(logps, mask.sum(-1), cfg, 0.1, decision=spec)
    result.loss.losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logps, result, grads


def assert_parity(unshared, shared) -> None:
    (a, ra, ga), (b, rb, gb) = unshared, shared
    for name, x, y in zip(a._fields, a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(ra.steps, rb.steps)  # ε-DPO's decisions, pair by pair
    torch.testing.assert_close(rb.loss.losses, ra.loss.losses, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_shared_rows_hand_checked():
    """P=2, C=2, R=3: positions restart, the rejected response sees the prompt and itself, never the chosen one."""
    pair = TokenizedPair([11, 12], [21, 22], [31, 32, 33], None, None, 0)
    collate = PreferenceCollator(PAD, pad_to_multiple_of=8)
    width = collate([pair])["input_ids"].shape[1]  # 8 (5 tokens, padded)
    rows = collate.shared_prefix([pair], width)
    assert rows.input_ids.tolist() == [[11, 12, 21, 22, 31, 32, 33, PAD]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0]]
    allowed = rows.allowed[0].int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0, 0]  # rejected's first token: prompt + itself
    assert allowed[6] == [1, 1, 0, 0, 1, 1, 1, 0]
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # chosen's last token
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1]  # padding sees itself only
    assert rows.grid == (2, 7) and rows.tokens == 7
    # chosen tokens (grid cells 1, 2 of row 0) from shared positions 1, 2; rejected (cells 1..3 of row 1) from the
    # last prompt position 1, then its own positions 4, 5
    assert rows.source.tolist() == [1, 2, 1, 4, 5]
    assert rows.target.tolist() == [1, 2, 7 + 1, 7 + 2, 7 + 3]


@pytest.mark.parametrize(
    ("kind", "attention", "padding"),
    [("llama", "sdpa", "right"), ("llama", "eager", "left"), ("qwen2", "sdpa", "left"), ("qwen2", "eager", "right")],
)
def test_full_fine_tuning_matches_unshared(kind, attention, padding):
    policy, frozen = tiny(kind, attention, seed=0), tiny(kind, attention, seed=1).eval()
    reference = LiveReference(frozen, None, fused=True)
    batch_pairs = pairs()
    unshared = step_outputs(policy, reference, batch_pairs, shared=False)
    shared = step_outputs(policy, reference, batch_pairs, shared=True, padding=padding)
    assert_parity(unshared, shared)
    assert unshared[0].policy[2] == 0 and unshared[0].policy[4 + 2] != 0  # pair 2: an empty chosen response
    assert set(unshared[1].steps.tolist()) != {0}  # decisions that move: the comparison is not vacuous


def test_lora_matches_unshared():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # adapters away from their zero start, so the policy differs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    reference = LiveReference(None, None, fused=True)  # the base under the adapters
    batch_pairs = pairs()
    unshared = step_outputs(model, reference, batch_pairs, shared=False)
    shared = step_outputs(model, reference, batch_pairs, shared=True)
    assert_parity(unshared, shared)
    assert all("lora" in n for n in unshared[2])


def test_hidden_state_cache_matches_unshared():
    policy, frozen = tiny("qwen2", seed=0), tiny("qwen2", seed=1)
    batch_pairs = pairs()
    cache = compute_reference_hidden(frozen, batch_pairs, PreferenceCollator(PAD), batch_size=len(batch_pairs))
    reference = CachedReference({"train": cache}, (frozen.lm_head.weight.detach(), None))
    unshared = step_outputs(policy, reference, batch_pairs, shared=False)
    shared = step_outputs(policy, reference, batch_pairs, shared=True)
    assert_parity(unshared, shared)


def test_reference_free_policy_side_matches():
    policy = tiny("llama")
    batch_pairs = pairs()
    collate = PreferenceCollator(PAD)
    batch = collate(batch_pairs)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels, mask = shift_for_logps(ids, batch["completion_mask"])
    rows = collate.shared_prefix(batch_pairs, ids.shape[1])
    out = []
    for shared in (None, rows):
        policy.zero_grad(set_to_none=True)
        logps = policy_only_logps(policy, ids, attention, labels, mask, LogpsOptions(), fused=True, shared=shared)
        logps.policy.pow(2).sum().backward()
        out.append((logps.policy.detach(), policy.lm_head.weight.grad.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-6)


def test_what_cannot_be_masked_is_named():
    assert shared_prefix_problem(tiny("llama")) is None
    windowed = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding-window" in shared_prefix_problem(windowed)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert "sliding-window" in shared_prefix_problem(mistral)
    flash = tiny("llama")
    flash.config._attn_implementation_internal = "flash_attention_2"  # as loaded with that implementation
    assert "flash_attention_2" in shared_prefix_problem(flash)


def test_a_model_that_ignores_the_mask_fails_the_check(monkeypatch):
    """The numeric check compares with the unshared rows: a forward that drops the custom mask is caught."""
    model = tiny("llama")
    batch_pairs = pairs()
    collate = PreferenceCollator(PAD)
    batch = collate(batch_pairs)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels, mask = shift_for_logps(ids, batch["completion_mask"])
    rows = collate.shared_prefix(batch_pairs, ids.shape[1])
    assert shared_prefix_mismatch(model, ids, attention, labels, mask, rows) is None
    forward = model.forward

    def plain_causal(*args, attention_mask=None, position_ids=None, **kwargs):
        return forward(*args, **kwargs)  # what a model that builds its own mask would do

    monkeypatch.setattr(model, "forward", plain_causal)
    assert "differ" in shared_prefix_mismatch(model, ids, attention, labels, mask, rows)


def tiny_run(tmp_path: Path, name: str, *overrides: str):
    from epsdpo.recipes.train import train
    from epsdpo.training import load_run_config
    from epsdpo.training.metrics import read_metrics

    cfg = load_run_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"output_dir={tmp_path / name}",
            f"dataset={ROOT / 'configs' / 'data' / 'tiny_preferences.jsonl'}",
            "disable_tqdm=true",
            "plot_after_training=false",
            "max_steps=2",
            "save_steps=0",
            *overrides,
        ],
    )
    result = train(cfg)
    return [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]


def test_training_shares_by_default_and_matches(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="epsdpo"):
        shared = tiny_run(tmp_path, "shared")
    assert "prefix_sharing=True" in caplog.text and "prefix sharing is off" not in caplog.text
    unshared = tiny_run(tmp_path, "unshared", "prefix_sharing=false")
    assert len(shared) == len(unshared) == 2
    for a, b in zip(unshared, shared, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "logps/ref_chosen", "kl/steps_weaker", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_unmaskable_model_falls_back_with_one_log_line(tmp_path, caplog):
    windowed = (
        "model_config={model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true, "
        "use_sliding_window: true, sliding_window: 8, max_window_layers: 0}"
    )
    with caplog.at_level(logging.WARNING, logger="epsdpo"):
        records = tiny_run(tmp_path, "windowed", windowed, "logps_kernel=eager")
    lines = [r.getMessage() for r in caplog.records if "prefix sharing is off" in r.getMessage()]
    assert len(lines) == 1 and "sliding-window" in lines[0]
    assert len(records) == 2
