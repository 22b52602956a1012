"""One writer per run directory: the lock against real second processes, stale and foreign locks, release on every
exit, and what a directory must hold before a run may write into it (epsdpo.runlock)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from epsdpo.errors import UserError
from epsdpo.runlock import (
    BREAK_LOCK_ENV,
    LOCK_NAME,
    OutputDirError,
    RunDirInUseError,
    check_writable_dir,
    claim_run_dir,
    output_file_lock,
    run_dir_lock,
)


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.stdout.readline() == "released\n"
    assert proc.wait() == 0


# ---- a second writer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", range(5))  # several times over: a flaky lock would show here
def test_a_second_process_is_refused_with_the_holders_details_and_may_go_on_once_it_ends(
    tmp_path, lock_holder, attempt
):
    run = tmp_path / "run"
    proc = lock_holder(run)
    with pytest.raises(RunDirInUseError) as refused, run_dir_lock(run):
        pass
    message = str(refused.value)
    assert f"pid {proc.pid}" in message and f"host {socket.gethostname()}" in message
    assert "started 20" in message and "command: -c" in message and str(run) in message
    assert isinstance(refused.value, UserError)
    _release(proc)
    assert not (run / LOCK_NAME).exists()  # released: the file is gone
    with run_dir_lock(run):
        holder_record = json.loads((run / LOCK_NAME).read_text())
        assert holder_record["pid"] == os.getpid() and holder_record["host"] == socket.gethostname()


def _contend(run: str, ready, tried, results) -> None:  # one of several processes started at once
    ready.wait()  # all start trying together
    try:
        with run_dir_lock(run):
            results.put("won")
            tried.wait()  # hold the lock until every other process has tried
    except RunDirInUseError:
        results.put("refused")
        tried.wait()


@pytest.mark.parametrize("attempt", range(3))
def test_of_processes_racing_for_one_directory_exactly_one_wins(tmp_path, attempt):
    n = 6
    ctx = multiprocessing.get_context("fork")
    ready, tried, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "run"), ready, tried, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=60) for _ in range(n))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcome == ["refused"] * (n - 1) + ["won"]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_an_output_file_is_locked_beside_it(tmp_path, lock_holder):
    output = tmp_path / "gen" / "pairs.jsonl"
    proc = lock_holder(output, "file")
    assert (tmp_path / "gen" / ".pairs.jsonl.lock").is_file()
    with pytest.raises(RunDirInUseError, match=rf"{output} is in use by another run: pid {proc.pid}"):
        with output_file_lock(output):
            pass
    with run_dir_lock(tmp_path / "gen"):  # the directory's own lock is another lock
        pass
    _release(proc)


# ---- stale and foreign locks --------------------------------------------------------------------------------------
def test_a_lock_left_by_a_killed_process_on_this_host_is_taken_over_with_a_warning(tmp_path, lock_holder, caplog):
    run = tmp_path / "run"
    proc = lock_holder(run)
    proc.kill()  # SIGKILL: nothing is cleaned up, the lock file stays
    proc.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="epsdpo.runlock"), run_dir_lock(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock left by pid {proc.pid}" in caplog.text
    assert "that process is no longer running" in caplog.text


def test_a_lock_from_another_host_is_refused_unless_forced(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": 4242, "host": "elsewhere.example", "started": "2026-01-02 03:04:05", "command": "epsdpo train"}
    (run / LOCK_NAME).write_text(json.dumps(record))
    monkeypatch.delenv(BREAK_LOCK_ENV, raising=False)
    with pytest.raises(RunDirInUseError, match=r"locked by a run on another host: pid 4242 on host elsewhere"):
        with run_dir_lock(run):
            pass
    assert json.loads((run / LOCK_NAME).read_text()) == record  # untouched
    monkeypatch.setenv(BREAK_LOCK_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="epsdpo.runlock"), run_dir_lock(run):
        assert json.loads((run / LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert f"{BREAK_LOCK_ENV} is set" in caplog.text


# ---- released on every exit ---------------------------------------------------------------------------------------
def test_released_after_an_exception_and_after_ctrl_c(tmp_path):
    run = tmp_path / "run"
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), run_dir_lock(run):
            assert (run / LOCK_NAME).is_file()
            raise error
        assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_process_ended_by_sigterm_or_sigint_releases_the_lock(tmp_path, lock_holder, sig):
    run = tmp_path / "run"
    proc = lock_holder(run)
    proc.send_signal(sig)
    assert proc.wait() != 0
    assert not (run / LOCK_NAME).exists()  # removed, not merely left for a stale takeover


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    run = tmp_path / "run"
    with run_dir_lock(run), run_dir_lock(run):  # e.g. `epsdpo train` evaluating its own run
        pass
    assert not (run / LOCK_NAME).exists()


def test_only_the_main_process_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_dir_lock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_NAME).exists()


# ---- unusable directories -----------------------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputDirError, match=r"output_dir='.*taken' is a file, not a directory"):
        check_writable_dir(tmp_path / "taken")
    with pytest.raises(OutputDirError, match=r"cannot be created: .*taken is a file"):
        check_writable_dir(tmp_path / "taken" / "run")


def test_a_read_only_output_dir_is_named(tmp_path, read_only_dir):
    (tmp_path / "ro").mkdir()
    read_only = read_only_dir(tmp_path / "ro")
    with pytest.raises(OutputDirError, match=r"output_dir='.*ro' is not writable \(.*\); choose a directory"):
        check_writable_dir(read_only)
    with pytest.raises(OutputDirError, match=r"not writable"), run_dir_lock(read_only / "run"):
        pass


# ---- whose directory ----------------------------------------------------------------------------------------------
def _is_run(directory: Path) -> bool:
    return (directory / "config.yaml").is_file()


def test_a_directory_holding_files_but_no_run_is_refused_unless_overwriting(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"holds files \(notes\.txt\) but no run; .*overwrite_output_dir=true"):
        claim_run_dir(out, overwrite=False, is_run=_is_run)
    assert (out / "notes.txt").read_text() == "mine"
    with caplog.at_level(logging.WARNING, logger="epsdpo.runlock"):
        moved = claim_run_dir(out, overwrite=True, is_run=_is_run)
    assert moved is not None and moved.parent == out and moved.name.startswith(".replaced-")
    assert (moved / "notes.txt").read_text() == "mine" and not (out / "notes.txt").exists()
    assert f"moved the earlier run in {out} (notes.txt) to {moved}" in caplog.text


def test_an_earlier_run_is_left_to_the_caller_and_an_empty_directory_is_fine(tmp_path):
    out = tmp_path / "out"
    assert claim_run_dir(out, overwrite=False, is_run=_is_run) is None  # absent
    out.mkdir()
    (out / LOCK_NAME).write_text("")
    assert claim_run_dir(out, overwrite=True, is_run=_is_run) is None  # only the lock: nothing to move
    (out / "config.yaml").write_text("train: {}\n")
    assert claim_run_dir(out, overwrite=False, is_run=_is_run) is None
    assert (out / "config.yaml").is_file()


def test_overwriting_twice_keeps_both_earlier_runs_apart(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("first")
    first = claim_run_dir(out, overwrite=True, is_run=_is_run)
    (out / "config.yaml").write_text("second")
    second = claim_run_dir(out, overwrite=True, is_run=_is_run)
    assert first != second and (first / "config.yaml").read_text() == "first"
    assert (second / "config.yaml").read_text() == "second" and not (second / first.name).exists()


def test_overwriting_and_resuming_contradict(tmp_path):
    with pytest.raises(OutputDirError, match="set only one of them"):
        claim_run_dir(tmp_path, overwrite=True, is_run=_is_run, resuming=True)


def test_only_the_main_process_moves_anything(tmp_path):
    (tmp_path / "config.yaml").write_text("x")
    assert claim_run_dir(tmp_path, overwrite=True, is_run=_is_run, main=False) is None
    assert (tmp_path / "config.yaml").is_file()


def test_log_files_neither_make_a_directory_foreign_nor_are_moved(tmp_path):
    """A launcher may write this run's log into the directory before the run starts (`… > OUT/train.log`)."""
    (tmp_path / "train.log").write_text("started\n")
    assert claim_run_dir(tmp_path, overwrite=False, is_run=_is_run) is None
    (tmp_path / "config.yaml").write_text("x")
    moved = claim_run_dir(tmp_path, overwrite=True, is_run=_is_run)
    assert (moved / "config.yaml").is_file() and (tmp_path / "train.log").read_text() == "started\n"
