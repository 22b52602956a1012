"""What the experiment scripts share: running ``epsdpo`` verbs as logged subprocesses, the commit and the machine a
summary records, and means with standard errors over seeds. Imported by the scripts beside it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epsdpo.stats import estimate

ROOT = Path(__file__).resolve().parents[1]


def standard_eval(reference_cache_dir: str) -> list[str]:
    """The ``epsdpo eval`` overrides of the trajectory and selection experiments' protocol: every one of the 110
    held-out prompts × 2 samples, the bundled held-out pairs, 48 new tokens, sampler seed 0 (so every run shares the
    reference part cached in ``reference_cache_dir``); ``forward_kl=false`` leaves out KL(π_ref‖π), one of the four
    log-prob passes."""
    return [
        "eval_dataset=bundled",
        "num_prompts=null",
        "samples_per_prompt=2",
        "max_pairs=null",
        "max_new_tokens=48",
        "batch_size=32",
        "seed=0",
        "disable_tqdm=true",
        f"reference_cache_dir={reference_cache_dir}",
        "forward_kl=false",
    ]


def epsdpo_command() -> str:
    """The ``epsdpo`` entry point of the interpreter running the experiment (its virtual environment)."""
    return str(Path(sys.executable).with_name("epsdpo"))


def call(args: list[str], log: Path) -> None:
    """Run one command from the repository root, offline, its output appended to ``log``; an error if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        code = subprocess.call(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited with {code}; see {log}")


def commit() -> str | None:
    """The short commit the experiment runs from: ``$EPSDPO_COMMIT`` when set (a copy of a checkout on another
    machine, whose ``.git`` may be missing or older than the files beside it, as a GPU machine's was), else git's;
    None when neither says."""
    if os.environ.get("EPSDPO_COMMIT"):
        return os.environ["EPSDPO_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> str:
    from epsdpo.machine import machine_label

    return machine_label()


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n); NaN where undefined (no value; one value for the error)."""
    if not values:
        return math.nan, math.nan
    est = estimate(values)
    return est.mean, est.se if est.n > 1 else math.nan


def fmt(mean: float, se: float, digits: int = 3) -> str:
    """``mean ± se`` (``—`` for NaN, the error left out where undefined)."""
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


@dataclass(frozen=True)
class Task:
    """One step of a grid (a training, one evaluation, a summary): ``action`` runs once every task named in ``after``
    has finished."""

    name: str
    action: Callable[[], object]
    after: tuple[str, ...] = ()


def run_tasks(tasks: Sequence[Task], jobs: int, say: Callable[[str], None] = print) -> dict[str, str]:
    """Run ``tasks`` on ``jobs`` threads (each task is a subprocess, so threads suffice): whenever a thread is free it
    starts the first task, in list order, whose prerequisites have all finished, so the list's order is the priority
    and the runs at its head are finished first. A task that fails is reported and the tasks that depend on it,
    directly or through others, are skipped; the others go on. Returns ``{task: why}`` for every task that failed or
    was skipped."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    for t in tasks:
        unknown = [a for a in t.after if a not in names]
        if unknown:
            raise ValueError(f"task {t.name!r} waits for {unknown}, which are not among the tasks")
    pending, done, failed = list(tasks), set(), {}
    running: dict[Future[object], Task] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for t in [t for t in pending if any(a in failed for a in t.after)]:
                pending.remove(t)
                failed[t.name] = "skipped: " + ", ".join(a for a in t.after if a in failed) + " did not finish"
                say(f"skip {t.name} ({failed[t.name]})")
            while len(running) < jobs:
                ready = next((t for t in pending if all(a in done for a in t.after)), None)
                if ready is None:
                    break
                pending.remove(ready)
                say(f"start {ready.name}")
                running[pool.submit(ready.action)] = ready
            if not running:
                if pending:  # unreachable with known names unless the prerequisites form a cycle
                    raise ValueError(f"tasks wait for each other in a cycle: {[t.name for t in pending]}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                error = future.exception()
                if error is None:
                    done.add(task.name)
                    say(f"done {task.name}")
                else:
                    failed[task.name] = f"{type(error).__name__}: {error}"
                    say(f"FAILED {task.name}: {failed[task.name]}")
    return failed


def grid_main(
    doc: str,
    tag: str,
    plan: Callable[..., list[Any]],
    load_summaries: Callable[[], list[dict[str, Any]]],
    run_one: Callable[[Any], Any],
    report: Callable[[list[dict[str, Any]]], tuple[Path, Path]],
    tasks: Callable[[Any, list[str], int], list[Task]] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> None:
    """The command line every grid experiment has: ``--list``, ``--report``, ``--only GLOB``, ``--max-runs N``; without
    ``--report`` it runs every planned run that has no summary yet (in plan order), then rebuilds the report.

    A grid that splits its runs into ``tasks`` (``tasks(run, names of the runs to do, jobs)``) takes ``--jobs N``: that
    many tasks at once, the runs first in plan order first (see :func:`run_tasks`), each subprocess with
    ``OMP_NUM_THREADS`` = cores ÷ N unless it is set. A grid that names its ``seeds`` takes ``--seeds 0,1,2,3``
    (``plan(seeds)``): further seeds after its own."""
    import argparse
    import fnmatch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the plan and what is done")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the summaries")
    parser.add_argument("--only", default="*", help="run only the runs whose name matches this glob")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    if tasks is not None:
        parser.add_argument("--jobs", type=int, default=1, help="tasks (trainings, evaluations) run at once")
    if seeds is not None:
        parser.add_argument(
            "--seeds",
            type=lambda text: tuple(int(x) for x in text.split(",")),
            default=seeds,
            help=f"the seeds to plan, comma-separated (default: {','.join(map(str, seeds))})",
        )
    args = parser.parse_args()
    runs = plan(args.seeds) if seeds is not None else plan()
    done = {s["name"] for s in load_summaries()}
    if args.list:
        for run in runs:
            print(f"{'done' if run.name in done else 'todo'}  {run.name}  {' '.join(run.overrides)}")
        return
    failed: dict[str, str] = {}
    if not args.report:
        todo = [r for r in runs if r.name not in done and fnmatch.fnmatch(r.name, args.only)][: args.max_runs]
        jobs = getattr(args, "jobs", 1)
        if jobs > 1:
            threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
            import torch

            torch.set_num_threads(int(threads))  # what the summaries' machine line records is what each task ran on
            names = [r.name for r in todo]
            say = lambda m: print(f"[{tag}] {time.strftime('%H:%M:%S')} {m}", flush=True)  # noqa: E731
            failed = run_tasks([t for run in todo for t in tasks(run, names, jobs)], jobs, say)
        else:
            for run in todo:
                print(f"[{tag}] {run.name}", flush=True)
                run_one(run)
    md, png = report(load_summaries())
    print(f"[{tag}] report: {md.relative_to(ROOT)}, {png.relative_to(ROOT)}")
    if failed:
        raise SystemExit(
            f"[{tag}] {len(failed)} tasks did not finish: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )


def train_seconds(run_dir: Path, measured: float, trained_now: bool) -> float | None:
    """The training's wall time: as measured around the call, or, when this invocation found the run trained
    already, the loop's own figure from ``final/final_metrics.json`` (None for runs saved before it was kept)."""
    if trained_now:
        return round(measured, 1)
    import json

    recorded = json.loads((run_dir / "final" / "final_metrics.json").read_text(encoding="utf-8")).get("train_seconds")
    return None if recorded is None else float(recorded)


def short_machine(summary: dict[str, Any]) -> str:
    """``Intel(R) Xeon(R) Processor (native bf16), 2 threads, …`` → ``Intel Xeon``; ``…, GPU NVIDIA H200`` →
    ``NVIDIA H200 (AMD EPYC …)``."""
    label = summary.get("machine", "")
    cpu = label.split(" (native")[0].split(" (no native")[0].split(" (bf16")[0]
    cpu = " ".join(w for w in cpu.replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU"))
    _, gpu_said, gpu = label.partition(", GPU ")
    return f"{gpu.strip()} ({cpu})" if gpu_said else cpu


def reference_text(
    summaries: list[dict[str, Any]], reward_of: Callable[[dict[str, Any]], float], consequence: str
) -> list[str]:
    """The reference's gold reward (``reward_of`` a summary), and which runs share which reference samples.

    ``consequence`` says, for the report at hand, what differing reference samples mean for its numbers.
    """
    by_value: dict[float, list[dict[str, Any]]] = {}
    for s in summaries:
        by_value.setdefault(round(reward_of(s), 4), []).append(s)
    if len(by_value) == 1:
        value = next(iter(by_value))
        return [f"Reference model (the same samples for every run): gold reward {value:.3f}."]
    lines = [
        "Reference model: the sampler's seed is the same for every run, but the samples depend on the machine's "
        "floating-point kernels (a last-bit difference in a logit changes a sampled token, and the rest of the "
        "response with it), so runs made on different machines were compared with different reference samples; "
        f"a policy's own samples move the same way. {consequence}",
        "",
    ]
    for value, rows in sorted(by_value.items()):
        machines = sorted({s.get("machine", "machine not recorded") for s in rows})
        lines.append(
            f"- reference gold reward {value:.3f} ({len(rows)} run{'s' * (len(rows) > 1)}; {'; '.join(machines)}): "
            + ", ".join(s["name"] for s in rows)
        )
    return lines
