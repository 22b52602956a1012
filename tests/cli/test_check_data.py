"""``epsdpo check-data`` end to end: through ``epsdpo.cli.main`` and once through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epsdpo.cli import main

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"


@pytest.fixture(autouse=True)
def _converted(smollm2_path: str) -> None:
    """check-data loads the default tokenizer by alias; make sure it is converted (and the cache exported)."""


def test_good_file_reports_and_exits_0(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = main(
        [
            "check-data",
            str(FIXTURES / "conversational.jsonl"),
            "max_length=40",
            "max_prompt_length=30",
            "--report-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "conversational.jsonl: 3 rows, 3 kept, 0 dropped" in out
    assert "truncated prompt_truncated: 2" in out and "dropped" not in out.split("0 dropped", 1)[1]
    assert "token lengths before truncation" in out and "p50=" in out
    assert "\n<|im_start|>assistant\n⟦|⟧4<|im_end|>" in out
    assert json.loads((tmp_path / "data_report.json").read_text())["kept"] == 3


def test_malformed_file_names_the_row_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check-data", str(FIXTURES / "malformed.jsonl")])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{FIXTURES / 'malformed.jsonl'}: row 2 (line 3), column 'chosen': the response is empty" in err


def test_skip_makes_the_malformed_file_usable(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check-data", str(FIXTURES / "malformed.jsonl"), "on_invalid=skip", "--examples", "1"])
    out = capsys.readouterr().out
    assert status == 0 and "4 rows, 3 kept, 1 dropped" in out and "dropped empty_text: 1" in out


def test_yaml_config_with_renamed_columns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: smollm2-135m-instruct\ndata:\n  dataset: {FIXTURES / 'renamed.jsonl'}\n"
        "  prompt_column: question\n  chosen_column: good\n  rejected_column: bad\nscores_column: ratings\n"
    )
    assert main(["check-data", str(config)]) == 0
    assert "2 rows, 2 kept" in capsys.readouterr().out


def test_bad_config_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(FIXTURES / "standard.jsonl"), "max_lenght=3"]) == 2
    assert "Did you mean 'max_length'" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(tmp_path: Path) -> None:
    script = shutil.which("epsdpo", path=str(Path(sys.executable).parent)) or shutil.which("epsdpo")
    assert script, "the epsdpo console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    good = subprocess.run(
        [script, "check-data", str(FIXTURES / "standard.jsonl")], capture_output=True, text=True, env=env, timeout=300
    )
    assert good.returncode == 0, good.stderr
    assert "4 rows, 4 kept, 0 dropped" in good.stdout
    bad = subprocess.run(
        [script, "check-data", str(FIXTURES / "malformed.jsonl")], capture_output=True, text=True, env=env, timeout=300
    )
    assert bad.returncode == 1 and "row 2 (line 3), column 'chosen'" in bad.stderr


def test_tokenizer_comes_from_the_model_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bos_tokenizer: object
) -> None:
    bos_tokenizer.save_pretrained(tmp_path / "tok")  # type: ignore[attr-defined]
    config = tmp_path / "run.yaml"
    config.write_text(f"models: {{model: {tmp_path / 'tok'}}}\ndataset: {FIXTURES / 'standard.jsonl'}\n")
    assert main(["check-data", str(config), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer: {tmp_path / 'tok'}" in out and "<s>What is the capital of France?⟦|⟧Paris.</s>" in out
