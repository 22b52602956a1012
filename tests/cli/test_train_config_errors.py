"""`epsdpo train` refuses a mistake anywhere in its config, nested evaluation settings included, before it loads a
model or creates the run directory (a typo in `eval_options` used to surface only after training had finished)."""

from __future__ import annotations

from pathlib import Path

import pytest

import epsdpo.recipes.train
from epsdpo.cli import main as cli_main


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval_options={num_prompt: 64}", "unknown config key 'eval_options.num_prompt'"),
        ("eval_options.num_prompt=64", "Did you mean 'num_prompts'?"),
        ("eval_options.num_prompts=-1", "eval_options"),
        ("eval_options={samples_per_prompt: 0}", "samples_per_prompt must be >= 1"),
        ("eval_options.temperature=hot", "eval_options.temperature"),
    ],
)
def test_a_nested_config_mistake_fails_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, override, expected):
    def no_training(*args, **kwargs):
        raise AssertionError("training started although the config is wrong")

    monkeypatch.setattr(epsdpo.recipes.train, "prepare_run", no_training)
    out = tmp_path / "run"
    assert cli_main(["train", f"output_dir={out}", override]) == 2
    printed = capsys.readouterr().out
    assert "epsdpo train: error:" in printed and expected in printed, printed
    assert not out.exists()


#: every value the hostile-user probe (issue #35) found accepted, or crashing after the model had loaded, with the
#: message it now gets when the config is loaded
REJECTED = [
    ("max_grad_norm=-1", "max_grad_norm must be > 0, or 0 to turn clipping off, got -1.0"),
    ("model_config={model_type: llama, hidden_size: 64, num_hidden_layer: 2}", "Did you mean 'num_hidden_layers'?"),
    ("model_config={model_type: lama}", "model_type 'lama' is not an architecture transformers knows"),
    ("decision_tolerance=nan", "config key 'decision_tolerance': nan is not a finite number"),
    ("decision_tolerance=-0.1", "decision_tolerance must be >= 0"),
    ("save_steps=-1", "save_steps must be >= 1, or 0 for no intermediate checkpoints, got -1"),
    ("eval_steps=-1", "eval_steps must be >= 1, or 0 to evaluate only at the end, got -1"),
    ("logging_steps=0", "logging_steps must be >= 1"),
    ("weight_decay=-0.01", "weight_decay must be >= 0 (0: no weight decay), got -0.01"),
    ("learning_rate=nan", "config key 'learning_rate': nan is not a finite number"),
    ("learning_rate=.inf", "config key 'learning_rate': inf is not a finite number"),
    ("learning_rate=0", "learning_rate must be > 0"),
    ("adam_beta1=1.5", "adam_beta1 must be in [0, 1), got 1.5"),
    ("adam_beta2=1", "adam_beta2 must be in [0, 1), got 1.0"),
    ("adam_epsilon=-1", "adam_epsilon must be > 0, got -1.0"),
    ("num_train_epochs=nan", "config key 'num_train_epochs': nan is not a finite number"),
    ("num_train_epochs=0", "num_train_epochs must be > 0"),
    ("warmup_steps=-3", "warmup_steps must be >= 0"),
    ("seed=-1", "seed must be in [0, 2**32)"),
    ("beta=-0.5", "beta must be a finite number > 0, got -0.5"),
    ("beta=nan", "config key 'beta': nan is not a finite number"),
    ("epsilon=1", "epsilon must be in [0, 1)"),
    ("epsilon=-0.01", "epsilon must be in [0, 1)"),
    ("beta_max=nan", "config key 'beta_max': nan is not a finite number"),
    ("use_lora=true;lora_dropout=1", "lora_dropout must be in [0, 1)"),
    ("logps_chunk_size=0", "logps_chunk_size must be >= 1"),
    ("resume_allow_changes=[max_step]", "'max_step' is not a setting. Did you mean 'max_steps'?"),
    ("resume_allow_changes=[learning_rate]", "'learning_rate' cannot change on resume"),
]


@pytest.mark.parametrize(("override", "expected"), REJECTED, ids=[o for o, _ in REJECTED])
def test_a_value_out_of_range_is_refused_when_the_config_is_loaded(tmp_path, monkeypatch, capsys, override, expected):
    import epsdpo.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although the config is wrong")

    monkeypatch.setattr(epsdpo.recipes.train, "prepare_run", no_model)
    for name in ("initial_model", "load_causal_lm", "build_from_config", "load_tokenizer"):
        monkeypatch.setattr(epsdpo.models, name, no_model)
    out = tmp_path / "run"
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    assert cli_main(["train", str(tiny), f"output_dir={out}", *override.split(";")]) == 2
    printed = capsys.readouterr().out
    assert "epsdpo train: error:" in printed and expected in printed, printed
    assert "Traceback" not in printed and not out.exists()
