"""What a user reads at the end of a run: ``final_metrics.json`` and the model card report the held-out figures ±
s.e. and the training figures as a mean over the last logged steps, never one step's noisy values as the result;
an adapter names its base by Hub id and still loads offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from epsdpo.training import load_run_config
from epsdpo.training.final import final_record, model_card, name_adapter_base
from epsdpo.training.metrics import held_out_figures, last_steps_means

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def steps(losses: list[float]) -> list[dict]:
    """Training records of a run whose last step is an outlier (as one step's 8 pairs can be)."""
    return [
        {"step": k + 1, "epoch": 0.1 * k, "loss": x, "rewards/accuracies": 1.0 - x / 2, "kl/beta": 0.1}
        for k, x in enumerate(losses)
    ]


def test_the_training_figures_are_the_mean_over_the_last_logged_steps():
    # 16 logged steps: the window is 16 // 8 = 2 steps (the plots' smoothing_window); the last step's loss 1.12
    # alone would read as divergence, the mean of steps 15-16 is (0.2 + 1.12) / 2 = 0.66
    records = steps([0.69] * 14 + [0.2, 1.12])
    held = [{"step": 8, "eval/loss": 0.5}]  # held-out records are not training figures
    means = last_steps_means(records + held)
    assert means["window"] == 2 and (means["first_step"], means["last_step"]) == (15, 16)
    assert means["loss"] == pytest.approx(0.66)
    assert means["rewards/accuracies"] == pytest.approx(1 - 0.66 / 2)
    assert "step" not in means.items() - {("first_step", 15)} and "epoch" not in means
    assert last_steps_means([]) == {} and last_steps_means(held) == {}
    # a figure missing from a step of the window is left out rather than averaged over fewer steps
    gappy = steps([0.5] * 16)
    del gappy[-2]["kl/beta"]
    assert "kl/beta" not in last_steps_means(gappy)


def test_the_held_out_figures_carry_standard_errors_over_pairs():
    # 4 pairs: losses 0.1, 0.3, 0.5, 0.7 (Σ 1.6, Σx² 0.84); margins 1, −1, 2, 2 (Σ 4, Σx² 10); 3 of 4 right
    sums = {
        "pairs": 4.0,
        "loss": 1.6,
        "loss_sq": 0.84,
        "rewards/margins": 4.0,
        "rewards/margins_sq": 10.0,
        "rewards/accuracies": 3.0,
    }
    figures = held_out_figures(sums)
    assert figures["eval/pairs"] == 4 and figures["eval/loss"] == pytest.approx(0.4)
    # losses: sample variance (0.84 − 1.6²/4) / 3 = 0.2 / 3 → se √(0.2 / 12)
    assert figures["eval/loss_se"] == pytest.approx(math.sqrt(0.2 / 12))
    # margins: mean 1, sample variance (10 − 4) / 3 = 2 → se √(2/4)
    assert figures["eval/rewards/margins_se"] == pytest.approx(math.sqrt(0.5))
    # accuracy 0.75: binomial √(0.75 · 0.25 / 3) = 0.25
    assert figures["eval/rewards/accuracies"] == 0.75 and figures["eval/rewards/accuracies_se"] == pytest.approx(0.25)
    assert held_out_figures({"pairs": 0.0}) == {}


def card_of(tmp_path: Path, evaluation: dict | None = None, *overrides: str) -> tuple[dict, str]:
    cfg = load_run_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    held_out = {
        "eval/loss": 0.41,
        "eval/loss_se": 0.02,
        "eval/rewards/accuracies": 0.8125,
        "eval/rewards/accuracies_se": 0.049,
        "eval/rewards/margins": 0.3652,
        "eval/rewards/margins_se": 0.031,
        "eval/pairs": 64.0,
        "loss": 1.12,  # the last training record's, passed along by the loop: not a held-out figure
    }
    record = final_record(16, 0.09, steps([0.69] * 14 + [0.2, 1.12]), held_out, 100.0, 4.0)
    record["seconds"]["saving"] = 2.0
    return record, model_card(cfg, record, {"kept": 64, "rows": 64}, evaluation)


def test_final_metrics_and_the_card_never_present_the_last_step_as_the_result(tmp_path):
    record, card = card_of(tmp_path)
    assert "loss" not in record and "rewards/accuracies" not in record  # no unlabelled last-step training figure
    assert record["train_mean_last_steps"]["loss"] == pytest.approx(0.66)
    assert record["eval/rewards/accuracies_se"] == 0.049 and record["eval/pairs"] == 64
    assert record["seconds"] == {"training_loop": 100.0, "held_out_pass": 4.0, "saving": 2.0}
    assert record["train_seconds"] == 100.0  # the loop alone, as the readers of train_seconds expect
    assert "## Training figures: mean over the last 2 logged steps (steps 15–16)" in card
    assert "| training loss (`loss`) | 0.66 |" in card and "1.12" not in card
    assert "| held-out preference accuracy (`eval/rewards/accuracies`) | 0.8125 ± 0.049 |" in card
    assert "The final policy on 64 held-out pairs" in card
    # the wall time by part, each saying what it includes; no evaluation yet
    assert "| training loop | 100.0 s |" in card and "| held-out pass | 4.0 s |" in card
    assert "| saving | 2.0 s |" in card and "| evaluation |" not in card and "| total | 106.0 s |" in card


EVALUATION = {
    "name": "after-training",
    "num_prompts": 128,
    "num_pairs": 64,
    "samples_per_prompt": 1,
    "gold_reward_gain": 0.43,
    "gold_reward_gain_se": 0.034,
    "kl": 18.9,
    "kl_se": 0.5,
    "win_rate": 0.88,
    "win_rate_se": 0.021,
    "preference_accuracy": 0.8125,
    "preference_accuracy_se": 0.049,
    "reward_margin": 0.3652,
    "reward_margin_se": 0.031,
    "beta": 0.09,
    "seconds": 60.0,
    "settings": {"prompts": "bundled", "prompt_split": "test", "reward": "sentiment"},
}


def test_the_card_gives_the_evaluation_with_s_e_and_n_and_says_whether_the_held_out_figures_agree(tmp_path):
    _, card = card_of(tmp_path, EVALUATION)
    assert "| paired gain in gold reward over the reference (`gold_reward_gain`) | 0.43 ± 0.034 | 128 prompts |" in card
    assert "(`kl`) | 18.9 ± 0.5 | 128 prompts |" in card and "(`win_rate`) | 0.88 ± 0.021 | 128 prompts |" in card
    assert "(`preference_accuracy`) | 0.8125 ± 0.049 | 64 pairs |" in card
    assert "one scoring of the same pairs" in card and "differ from these" not in card
    assert "| evaluation | 60.0 s |" in card and "| total | 2.8 min |" in card
    # an evaluation of 32 of the pairs at another β: the card says why the margins differ
    other = {**EVALUATION, "num_pairs": 32, "reward_margin": 0.373, "beta": 0.1}
    _, card = card_of(tmp_path, other)
    assert "The evaluation's held-out margin (0.373) and accuracy (0.8125) differ from these (0.3652, 0.8125)" in card
    assert "it scored 32 pairs, this pass 64.0" in card and "β = 0.1, this pass β = 0.09" in card
    # a reference-free loss: its margin is not the evaluation's implicit reward
    _, card = card_of(tmp_path, {**EVALUATION, "reward_margin": 1.5}, "loss_type=simpo")
    assert "reference-free loss's margin is its own reward" in card


def test_an_adapter_records_its_base_by_hub_id_and_loads_offline_from_the_builtin_copy(tmp_path):
    from epsdpo.models import adapter_base

    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"base_model_name_or_path": "/home/x/.cache/epsdpo/smollm2", "r": 16}))
    name_adapter_base(adapter, load_run_config(None, ["use_lora=true"]))  # the built-in alias's run
    assert json.loads(adapter.read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter_base(tmp_path) == "smollm2-135m-instruct"  # loaded from the offline copy, not the Hub
    name_adapter_base(adapter, load_run_config(TINY, []))  # a random-init model has no Hub id: left as it is
    assert json.loads(adapter.read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter.write_text(json.dumps({"base_model_name_or_path": "some/model"}))
    assert adapter_base(tmp_path) == "some/model" and adapter_base(tmp_path / "nothing") is None


def test_load_causal_lm_loads_an_adapter_directory_onto_its_base(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from epsdpo.models import load_causal_lm

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = lora.merge_and_unload()(ids).logits
    loaded = load_causal_lm(str(tmp_path / "adapter"))
    assert not hasattr(loaded, "peft_config")  # a plain model, the adapter merged in
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
