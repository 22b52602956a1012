"""A run directory belongs to one run (`epsdpo train` on configs/tiny.yaml): the lock against a second process,
overwrite_output_dir moving the earlier run aside, a directory that holds no run, an output_dir that cannot be used,
and a full disk while a checkpoint, metrics or the final model is written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import epsdpo
import epsdpo.recipes.train
import epsdpo.training.checkpoint as checkpoint_module
import epsdpo.training.loop
import epsdpo.training.metrics as metrics_module
from epsdpo.cli import main as cli_main
from epsdpo.errors import DiskFullError
from epsdpo.recipes.train import train
from epsdpo.runlock import LOCK_NAME
from epsdpo.training import load_run_config
from epsdpo.training.checkpoint import STATE_FILE, checkpoint_dirs, resolve_resume, save_checkpoint
from epsdpo.training.final import save_final_model
from epsdpo.training.metrics import MetricsWriter, read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
SRC = str(Path(epsdpo.__file__).resolve().parents[1])


def tiny_args(out: Path, *overrides: str) -> list[str]:
    return [f"output_dir={out}", f"dataset={DATA}", "disable_tqdm=true", "plot_after_training=false", *overrides]


def tiny(out: Path, *overrides: str):
    return load_run_config(TINY, tiny_args(out, *overrides))


# ---- overwrite_output_dir ---------------------------------------------------------------------------------------
def test_overwrite_moves_the_earlier_run_aside_so_nothing_of_it_is_resumed_or_mixed(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "max_steps=12", "save_steps=6", "save_total_limit=1"))
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-12"]
    train(tiny(out, "max_steps=10", "save_steps=5", "save_total_limit=1", "overwrite_output_dir=true"))
    # the new run's checkpoints only: rotation kept the new checkpoint-10, not the old checkpoint-12
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-10"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, 11))
    assert json.loads((out / "final" / "final_metrics.json").read_text())["step"] == 10
    assert resolve_resume("auto", out) == out / "checkpoint-10"
    (replaced,) = out.glob(".replaced-*")
    assert [p.name for p in checkpoint_dirs(replaced)] == ["checkpoint-12"]
    assert json.loads((replaced / "final" / "final_metrics.json").read_text())["step"] == 12
    assert len([r for r in read_metrics(replaced / "metrics.jsonl") if "loss" in r]) == 12
    assert not (out / LOCK_NAME).exists()


def test_a_directory_holding_files_but_no_run_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: own file\n")
    (out / "metrics.txt").write_text("keep me\n")
    assert cli_main(["train", str(TINY), *tiny_args(out, "max_steps=2")]) == 2
    printed = capsys.readouterr().out
    assert "holds files (config.yaml, metrics.txt) but no run of `epsdpo train`" in printed, printed
    assert "overwrite_output_dir=true" in printed and "Traceback" not in printed
    assert (out / "config.yaml").read_text() == "my: own file\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.txt"]


def test_overwrite_together_with_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(
        ["train", str(TINY), *tiny_args(out, "max_steps=2", "overwrite_output_dir=true", "resume_from_checkpoint=auto")]
    )
    assert code == 2
    assert "set only one of them" in capsys.readouterr().out


# ---- the lock -----------------------------------------------------------------------------------------------------
def test_a_second_train_into_a_directory_in_use_is_refused_naming_the_holder(tmp_path, lock_holder, capsys):
    out = tmp_path / "run"
    proc = lock_holder(out)
    assert cli_main(["train", str(TINY), *tiny_args(out, "max_steps=2")]) == 2
    printed = capsys.readouterr().out
    assert f"epsdpo train: error: {out} is in use by another run: pid {proc.pid} on host" in printed, printed
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    proc.stdin.close()
    assert proc.wait() == 0
    assert cli_main(["train", str(TINY), *tiny_args(out, "max_steps=2")]) == 0  # free again


def test_train_holds_the_lock_while_it_runs_and_releases_it_after_a_failure(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []

    def fail_in_the_loop(self):
        seen.append(json.loads((out / LOCK_NAME).read_text())["pid"])
        raise RuntimeError("a failure inside the run")

    monkeypatch.setattr(epsdpo.recipes.train.Trainer, "fit", fail_in_the_loop)
    with pytest.raises(RuntimeError, match="a failure inside the run"):
        train(tiny(out, "max_steps=2"))
    assert seen == [os.getpid()] and not (out / LOCK_NAME).exists()


# ---- unusable output_dir, through the CLI -------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main(["train", str(TINY), *tiny_args(tmp_path / "file", "max_steps=2")]) == 2
    printed = capsys.readouterr().out
    assert f"epsdpo train: error: output_dir='{tmp_path / 'file'}' is a file, not a directory" in printed


def test_a_model_path_that_does_not_exist_is_one_message(tmp_path, capsys):
    code = cli_main(["train", str(TINY), *tiny_args(tmp_path / "run", "model=/no/such/model", "model_config=null")])
    assert code == 2
    printed = capsys.readouterr().out
    assert "epsdpo train: error: model '/no/such/model': no such directory" in printed, printed
    assert "Repo id" not in printed


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "epsdpo.cli", "train", str(TINY), *tiny_args(tmp_path / "file", "max_steps=2")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "is a file, not a directory" in proc.stdout
    debug = subprocess.run(
        [sys.executable, "-m", "epsdpo.cli", "train", "--debug", str(TINY), *tiny_args(tmp_path / "file")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "OutputDirError" in debug.stderr


# ---- a full disk ---------------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _Scheduler:
    def state_dict(self):
        return {"step": 1}


def _save(out: Path, step: int):
    return save_checkpoint(
        out,
        step,
        rank=0,
        barrier=lambda: None,
        write_weights=lambda d: torch.save({"w": torch.ones(2)}, d / "weights.pt"),
        scheduler=_Scheduler(),
        trainer_state={"global_step": step},
        save_total_limit=2,
    )


@pytest.mark.parametrize("failing", ["torch.save", "write_json"])
def test_a_full_disk_during_a_checkpoint_keeps_the_last_complete_one_and_no_partial(tmp_path, monkeypatch, failing):
    _save(tmp_path, 5)
    if failing == "torch.save":
        monkeypatch.setattr(checkpoint_module.torch, "save", _enospc)
    else:
        monkeypatch.setattr(checkpoint_module, "_write_json", _enospc)
    with pytest.raises(DiskFullError) as full:
        _save(tmp_path, 10)
    message = str(full.value)
    assert message.startswith(
        f"disk full: writing checkpoint-10 (the last complete checkpoint is kept) into {tmp_path}"
    )
    assert full.value.directory == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert (tmp_path / "checkpoint-5" / STATE_FILE).is_file()


def test_torchs_own_write_error_counts_as_a_full_disk_only_when_space_is_short(tmp_path, monkeypatch):
    _save(tmp_path, 5)

    def torch_write_failure(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_write_failure)
    monkeypatch.setattr("epsdpo.errors._free_bytes", lambda d: 1000)
    with pytest.raises(DiskFullError, match=r"disk full: .* \(0\.0 MiB free\)"):
        _save(tmp_path, 10)
    monkeypatch.setattr("epsdpo.errors._free_bytes", lambda d: 10 * 2**30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _save(tmp_path, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_a_full_disk_while_logging_metrics_names_the_directory(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
    writer.write({"step": 1, "loss": 0.5})
    monkeypatch.setattr(metrics_module, "open", _enospc, raising=False)
    with pytest.raises(DiskFullError, match=rf"disk full: writing metrics\.jsonl into {tmp_path} failed"):
        writer.write({"step": 2, "loss": 0.4})


def test_a_full_disk_while_saving_the_final_model_leaves_no_partial(tmp_path):
    cfg = tiny(tmp_path / "run")

    class Model:
        def save_pretrained(self, directory, **kwargs):
            Path(directory).mkdir(parents=True)
            (Path(directory) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    final = tmp_path / "run" / "final"
    with pytest.raises(DiskFullError, match=rf"disk full: writing the final model into {final.parent} failed"):
        save_final_model(Model(), None, final, cfg, {"step": 1, "beta": 0.1}, {})
    assert not final.exists() and not final.with_name("final.partial").exists()


def test_a_full_disk_during_training_is_one_message_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = checkpoint_module.write_local_weights

    def full_at_step_4(directory, *args, **kwargs):
        if directory.name == ".checkpoint-4.partial":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(epsdpo.training.loop, "write_local_weights", full_at_step_4)
    assert cli_main(["train", str(TINY), *tiny_args(out, "max_steps=4", "save_steps=2")]) == 2
    printed = capsys.readouterr().out
    assert (
        f"epsdpo train: error: disk full: writing checkpoint-4 (the last complete checkpoint is kept) into {out}"
        in (printed)
    ), printed
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2"]
    assert not list(out.glob(".*.partial")) and not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    assert (
        cli_main(["train", str(TINY), *tiny_args(out, "max_steps=4", "save_steps=2", "resume_from_checkpoint=auto")])
        == 0
    )
