"""`epsdpo train` refuses a mistake anywhere in its config, nested evaluation settings included, before it loads a
model or creates the run directory (a typo in `eval_options` used to surface only after training had finished)."""

from __future__ import annotations

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
