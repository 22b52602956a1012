"""Trust is explicit (issue #35, item 4): `trust_remote_code` is honoured only when this command passes it, never
taken from a run directory's config.yaml. The probe's case: a shared run directory whose model carries its own code
(`auto_map`); evaluating it ran that code (a marker file appeared)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from epsdpo.stages.evaluate import evaluate


def model_with_code(directory: Path, marker: Path) -> Path:
    """A model directory whose config points at Python code in it; importing that code writes ``marker``."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "marker-model",
                "auto_map": {"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"},
            }
        )
    )
    (directory / "marker.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib

            from transformers import PretrainedConfig, PreTrainedModel

            pathlib.Path({str(marker)!r}).write_text("this code ran")


            class MarkerConfig(PretrainedConfig):
                model_type = "marker-model"


            class MarkerModel(PreTrainedModel):
                config_class = MarkerConfig
            """
        )
    )
    return directory


def test_evaluating_a_run_directory_never_takes_trust_remote_code_from_it(tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    model = model_with_code(tmp_path / "shared-model", marker)
    run = tmp_path / "shared-run"
    run.mkdir()
    config = {
        "models": {"model": str(model), "trust_remote_code": True},
        "data": {"tokenizer": "smollm2-135m-instruct"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers refuses the model's own code
        evaluate({"run_dir": str(run), "checkpoint": 0, "tokenizer": "smollm2-135m-instruct", "num_prompts": 1})
    assert not marker.exists(), "the run directory's trust_remote_code made its model's code run"
    assert "a run directory never grants it" in capsys.readouterr().err
