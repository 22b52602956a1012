"""What the experiment scripts share: running ``epsdpo`` verbs as logged subprocesses, the commit and the machine a
summary records, and means with standard errors over seeds. Imported by the scripts beside it."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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
    """The short commit the experiment runs from (None outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> str:
    from epsdpo.machine import machine_label

    return machine_label()


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n); NaN where undefined (no value; one value for the error)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def fmt(mean: float, se: float, digits: int = 3) -> str:
    """``mean ± se`` (``—`` for NaN, the error left out where undefined)."""
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def grid_main(
    doc: str,
    tag: str,
    plan: Callable[[], list[Any]],
    load_summaries: Callable[[], list[dict[str, Any]]],
    run_one: Callable[[Any], Any],
    report: Callable[[list[dict[str, Any]]], tuple[Path, Path]],
) -> None:
    """The command line every grid experiment has: ``--list``, ``--report``, ``--only GLOB``, ``--max-runs N``; without
    ``--report`` it runs every planned run that has no summary yet (in plan order), then rebuilds the report."""
    import argparse
    import fnmatch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the plan and what is done")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the summaries")
    parser.add_argument("--only", default="*", help="run only the runs whose name matches this glob")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    args = parser.parse_args()
    done = {s["name"] for s in load_summaries()}
    if args.list:
        for run in plan():
            print(f"{'done' if run.name in done else 'todo'}  {run.name}  {' '.join(run.overrides)}")
        return
    if not args.report:
        todo = [r for r in plan() if r.name not in done and fnmatch.fnmatch(r.name, args.only)]
        for run in todo[: args.max_runs]:
            print(f"[{tag}] {run.name}", flush=True)
            run_one(run)
    md, png = report(load_summaries())
    print(f"[{tag}] report: {md.relative_to(ROOT)}, {png.relative_to(ROOT)}")


def train_seconds(run_dir: Path, measured: float, trained_now: bool) -> float | None:
    """The training's wall time: as measured around the call, or, when this invocation found the run trained
    already, the loop's own figure from ``final/final_metrics.json`` (None for runs saved before it was kept)."""
    if trained_now:
        return round(measured, 1)
    import json

    recorded = json.loads((run_dir / "final" / "final_metrics.json").read_text(encoding="utf-8")).get("train_seconds")
    return None if recorded is None else float(recorded)


def short_machine(summary: dict[str, Any]) -> str:
    """``Intel(R) Xeon(R) Processor (native bf16), 2 threads, …`` → ``Intel Xeon``."""
    cpu = summary.get("machine", "").split(" (native")[0].split(" (no native")[0].split(" (bf16")[0]
    return " ".join(w for w in cpu.replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU"))


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
