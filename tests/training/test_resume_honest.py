"""Resume is honest (issue #35, item 3): a resume refuses settings that change the run's meaning (old and new value
named) unless `resume_allow_changes` names them, records only what it uses, never rewrites a finished run's results,
refuses to start over an unfinished run, names a damaged checkpoint with the intact one to use, and drops a torn
last line of metrics.jsonl. One tiny run (4 steps, checkpoints at 2 and 4) is trained once and copied per test."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import epsdpo.recipes.train
from epsdpo.cli import main as cli_main
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config
from epsdpo.training.checkpoint import STATE_FILE
from epsdpo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
BASE = ("max_steps=4", "save_steps=2", "disable_tqdm=true", "plot_after_training=false", f"dataset={DATA}")
TIMING = {"tokens_per_second"}


def args(out: Path, *overrides: str) -> list[str]:
    return [str(TINY), f"output_dir={out}", *BASE, *overrides]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    train(load_run_config(TINY, [f"output_dir={out}", *BASE]))
    return out


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished 4-step run."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


@pytest.fixture
def unfinished(run) -> Path:
    """The run as a kill after step 4's checkpoint leaves it: no final/ (metrics of steps 1-4, checkpoints 2 and 4)."""
    shutil.rmtree(run / "final")
    return run


def no_model(monkeypatch, *, nothing: bool = False) -> None:
    """Fail the test if a model is loaded (``nothing``: if the run is prepared at all)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run is refused or has nothing to do")

    monkeypatch.setattr(epsdpo.recipes.train, "build_policy_and_reference", refuse)
    if nothing:
        monkeypatch.setattr(epsdpo.recipes.train, "prepare_run", refuse)


def train_cli(capsys, out: Path, *overrides: str) -> tuple[int, str]:
    code = cli_main(["train", *args(out, *overrides)])
    printed = capsys.readouterr().out
    assert "Traceback" not in printed
    return code, printed


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named", "advice"),
    [
        ("learning_rate=0.1", "learning_rate: 0.001 → 0.1", "cannot change on resume"),
        ("seed=1", "seed: 0 → 1", "cannot change on resume"),
        ("epsilon=0.02", "epsilon: 0.01 → 0.02", "cannot change on resume"),
        ("loss_type=dpo", "loss_type: 'epsilon_dpo' → 'dpo'", "cannot change on resume"),
        ("beta=0.2", "beta: 0.1 → 0.2", "cannot change on resume"),
        ("per_device_train_batch_size=2", "per_device_train_batch_size: 4 → 2", "cannot change on resume"),
        ("warmup_ratio=0.5", "warmup_ratio: 0.1 → 0.5", "resume_allow_changes=[warmup_ratio]"),
        ("max_length=64", "max_length: 96 → 64", "resume_allow_changes=[max_length]"),
    ],
)
def test_a_resume_with_other_settings_is_refused_naming_old_and_new(
    unfinished, capsys, monkeypatch, change, named, advice
):
    no_model(monkeypatch)
    before = snapshot(unfinished)
    code, printed = train_cli(capsys, unfinished, "resume_from_checkpoint=auto", change)
    assert code == 2 and named in printed and advice in printed, printed
    assert snapshot(unfinished) == before  # config.yaml keeps the values the run used


@pytest.mark.slow
def test_another_dataset_is_refused_unless_allowed(unfinished, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    rows = DATA.read_text().splitlines()
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same pairs in another order: other batches
    config = (unfinished / "config.yaml").read_text()
    code, printed = train_cli(capsys, unfinished, "resume_from_checkpoint=auto", f"dataset={other}")
    assert code == 2 and f"dataset: '{DATA}' → '{other}'" in printed, printed
    assert "resume_allow_changes=[dataset]" in printed and (unfinished / "config.yaml").read_text() == config
    code, printed = train_cli(
        capsys, unfinished, "resume_from_checkpoint=auto", f"dataset={other}", "resume_allow_changes=[dataset]"
    )
    assert code == 0 and "done after 4 steps" in printed, printed  # allowed: it continues (nothing left to train)
    assert f"dataset: {other}" in (unfinished / "config.yaml").read_text()


@pytest.mark.slow
def test_a_changed_data_file_under_the_same_name_is_refused(run, capsys):
    data = run.parent / "data.jsonl"
    shutil.copy(DATA, data)
    out = run.parent / "same-name"
    train(load_run_config(TINY, [f"output_dir={out}", *BASE, f"dataset={data}"]))
    shutil.rmtree(out / "final")
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    code, printed = train_cli(capsys, out, f"dataset={data}", "resume_from_checkpoint=auto")
    assert code == 2 and "trained on other pairs" in printed and "resume_allow_changes=[dataset]" in printed, printed


@pytest.mark.slow
def test_a_longer_max_steps_continues_a_finished_run_when_allowed(run, capsys):
    code, printed = train_cli(capsys, run, "resume_from_checkpoint=auto", "max_steps=6")
    assert code == 2 and "max_steps: 4 → 6" in printed and "resume_allow_changes=[max_steps]" in printed, printed
    code, printed = train_cli(
        capsys, run, "resume_from_checkpoint=auto", "max_steps=6", "resume_allow_changes=[max_steps]"
    )
    assert code == 0 and "done after 6 steps" in printed, printed
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    final = json.loads((run / "final" / "final_metrics.json").read_text())
    # six logged steps: the training figures' window is 1 step (smoothing_window), the last one
    assert final["step"] == 6 and final["train_mean_last_steps"]["loss"] == records[-1]["loss"]
    assert final["train_seconds"] > 0 and final["train_mean_last_steps"]["window"] == 1
    assert "max_steps: 6" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_rerunning_a_finished_run_with_auto_resume_keeps_its_results(run, capsys, monkeypatch):
    """It used to rewrite final_metrics.json with only step, β and train_seconds 0, and empty the card's table."""
    no_model(monkeypatch, nothing=True)
    before = snapshot(run)
    final = json.loads((run / "final" / "final_metrics.json").read_text())
    code, printed = train_cli(capsys, run, "resume_from_checkpoint=auto")
    assert code == 0 and "already done (nothing left to train" in printed and "after 4 steps" in printed, printed
    assert f"β after training = {final['beta']:.6g}" in printed and snapshot(run) == before
    assert {"loss", "rewards/margins"} <= set(final["train_mean_last_steps"]) and final["train_seconds"] > 0


@pytest.mark.slow
def test_a_restart_without_resume_over_an_unfinished_run_is_refused_with_the_command(unfinished, capsys):
    before = snapshot(unfinished)
    code, printed = train_cli(capsys, unfinished)
    assert code == 2 and "holds an unfinished run (checkpoints checkpoint-2, checkpoint-4)" in printed, printed
    command = f"epsdpo train {TINY} output_dir={unfinished} {' '.join(BASE)} resume_from_checkpoint=auto"
    assert f"to resume it: {command}" in printed
    assert snapshot(unfinished) == before  # metrics.jsonl not appended to


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("optimizer", "optimizer.pt is cut short"),
        ("weights", "model.safetensors is"),
        ("state", f"{STATE_FILE} is not valid JSON"),
        ("controller key", "the β controller's state lacks ['pending']"),
        ("rng", "rng_state_0.pt is missing"),
        ("negative beta", "β is -0.5"),
        ("nan beta", "β is nan"),
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(unfinished, capsys, monkeypatch, damage, words):
    no_model(monkeypatch)
    last = unfinished / "checkpoint-4"
    if damage in ("optimizer", "weights", "state"):
        name = {"optimizer": "optimizer.pt", "weights": "model.safetensors", "state": STATE_FILE}[damage]
        data = (last / name).read_bytes()
        (last / name).write_bytes(data[: len(data) // 2])
    elif damage == "rng":
        (last / "rng_state_0.pt").unlink()
    else:
        state = json.loads((last / STATE_FILE).read_text())
        if damage == "controller key":
            del state["beta_controller"]["pending"]
        else:
            state["beta_controller"]["beta"] = -0.5 if damage == "negative beta" else math.nan
        (last / STATE_FILE).write_text(json.dumps(state))
    code, printed = train_cli(capsys, unfinished, "resume_from_checkpoint=auto")
    assert code == 2 and f"checkpoint {last} cannot be resumed from" in printed and words in printed, printed
    assert f"resume_from_checkpoint={unfinished / 'checkpoint-2'}" in printed


@pytest.mark.slow
def test_a_torn_last_line_of_metrics_is_dropped_with_a_warning_on_resume(finished_run, unfinished, caplog):
    shutil.rmtree(unfinished / "checkpoint-4")
    metrics = unfinished / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:3]) + lines[3][:25])  # steps 1-3, and step 4 cut short by a kill
    with caplog.at_level("WARNING"):
        train(load_run_config(TINY, [f"output_dir={unfinished}", *BASE, "resume_from_checkpoint=auto"]))
    assert any("last line was cut short" in r.getMessage() for r in caplog.records)
    assert comparable(read_metrics(metrics)) == comparable(read_metrics(finished_run / "metrics.jsonl"))


@pytest.mark.slow
def test_resuming_a_run_given_trust_remote_code_needs_the_flag_again(unfinished, capsys, monkeypatch):
    no_model(monkeypatch)
    state_file = unfinished / "checkpoint-4" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["run"]["config"]["models"]["trust_remote_code"] = True  # as a run trained with the flag records it
    state_file.write_text(json.dumps(state))
    code, printed = train_cli(capsys, unfinished, "resume_from_checkpoint=auto")
    assert code == 2 and "trained with trust_remote_code=true" in printed, printed
    assert "pass trust_remote_code=true on this command" in printed
