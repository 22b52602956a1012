"""experiments/_runs.run_tasks: the task pool behind the grids' ``--jobs``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from _runs import Task, run_tasks  # noqa: E402


def recorder():
    order: list[str] = []
    lock = threading.Lock()

    def task(name: str, after: tuple[str, ...] = (), fail: bool = False) -> Task:
        def action() -> None:
            with lock:
                order.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")

        return Task(name, action, after)

    return order, task


def test_one_job_runs_the_list_in_order_whenever_prerequisites_allow():
    order, task = recorder()
    tasks = [task("b", after=("a",)), task("a"), task("c", after=("b",)), task("d")]
    assert run_tasks(tasks, 1, say=lambda _: None) == {}
    assert order == ["a", "b", "c", "d"]  # b is first in the list but waits for a; then the list order again


def test_several_jobs_run_at_once_and_no_more():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three wait on it together
    assert run_tasks([Task(n, barrier.wait) for n in "xyz"], 3, say=lambda _: None) == {}
    barrier = threading.Barrier(3, timeout=0.5)
    failed = run_tasks([Task(n, barrier.wait) for n in "xyz"], 2, say=lambda _: None)
    assert sorted(failed) == ["x", "y", "z"]  # two at a time never meet the third: the barrier breaks


def test_a_failure_skips_what_depends_on_it_and_nothing_else():
    order, task = recorder()
    messages: list[str] = []
    tasks = [
        task("train", fail=True),
        task("eval", after=("train",)),
        task("summary", after=("eval",)),
        task("other"),
    ]
    failed = run_tasks(tasks, 2, say=messages.append)
    assert sorted(order) == ["other", "train"]
    assert failed["train"] == "RuntimeError: train broke"
    assert failed["eval"] == "skipped: train did not finish" and failed["summary"] == "skipped: eval did not finish"
    assert "other" not in failed and "FAILED train: RuntimeError: train broke" in messages


def test_unknown_prerequisites_repeated_names_and_cycles_are_refused():
    _, task = recorder()
    with pytest.raises(ValueError, match="'b' waits for \\['nope'\\]"):
        run_tasks([task("b", after=("nope",))], 1)
    with pytest.raises(ValueError, match="repeat"):
        run_tasks([task("a"), task("a")], 1)
    with pytest.raises(ValueError, match="cycle"):
        run_tasks([task("a", after=("b",)), task("b", after=("a",))], 2, say=lambda _: None)
    with pytest.raises(ValueError, match="at least 1"):
        run_tasks([], 0)
