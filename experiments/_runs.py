"""What the experiment scripts share: running ``epsdpo`` verbs as logged subprocesses, the commit and the machine a
summary records, and means with standard errors over seeds. Imported by the scripts beside it."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

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
