"""The main job's wall time as a new user meets it: a fresh clone at a commit, its set-up, then the main job twice.

    python3 benchmarks/main_job.py                          # HEAD of this repository
    python3 benchmarks/main_job.py --commit 87c272f --commit HEAD   # before and after, one after the other

For each commit: ``git clone`` of this repository at that commit into a temporary directory (no ``.venv``, so the
set-up creates one; the pip download cache of this machine is warm for every commit alike), an empty cache directory
(``EPSDPO_CACHE_DIR``: the converted SmolLM2 and any reference cache start empty), then

1. ``bash scripts/setup.sh`` (what ``scripts/quickstart.sh`` runs first; timed on its own),
2. ``bash scripts/quickstart.sh output_dir=runs/cold``: the main job with an empty cache (its set-up step is now a
   no-op), the "fresh clone" figure being 1 + 2,
3. ``bash scripts/quickstart.sh output_dir=runs/warm``: the same job again, everything cached that the commit caches.

Reported per run: its wall time, and from what the run wrote, the training loop's time (``final_metrics.json``
``train_seconds``) and the evaluation's (``eval.json`` ``seconds``); the rest is loading, converting, the held-out
pass, saving and plotting. Also each run's headline figures (gain, its s.e., held-out accuracy), so that a faster
main job is seen to measure the same thing. Run it on a quiet machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the command and its children) of one command: the CPU figure
    is the one to compare when something else shares the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return round(wall, 1), round(cpu, 1)


def run_figures(run: Path) -> dict[str, Any]:
    final = json.loads((run / "final" / "final_metrics.json").read_text(encoding="utf-8"))
    ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    return {
        "train_seconds": final.get("train_seconds"),
        "eval_seconds": ev.get("seconds"),
        "gain": ev.get("gold_reward_gain"),
        "gain_se": ev.get("gold_reward_gain_se"),
        "held_out_accuracy": ev.get("preference_accuracy"),
        "reference_cache": ev.get("reference_cache"),
    }


def measure(commit: str, work: Path) -> dict[str, Any]:
    clone = work / f"clone-{commit[:12]}"
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "EPSDPO_VENV")}
    env.update(EPSDPO_CACHE_DIR=str(work / f"cache-{commit[:12]}"), HF_HUB_OFFLINE="1")
    log = work / f"main-job-{commit[:12]}.log"
    out: dict[str, Any] = {"commit": commit, "log": str(log)}
    out["setup_seconds"], out["setup_cpu_seconds"] = timed(["bash", "scripts/setup.sh"], clone, env, log)
    for name in ("cold", "warm"):
        load = os.getloadavg()[0]
        seconds, cpu = timed(["bash", "scripts/quickstart.sh", f"output_dir=runs/{name}"], clone, env, log)
        out[name] = {"seconds": seconds, "cpu_seconds": cpu, "load_before": load, **run_figures(clone / "runs" / name)}
        print(f"[main_job] {commit[:12]} {name}: {seconds} s wall, {cpu} s CPU", file=sys.stderr, flush=True)
    out["fresh_clone_seconds"] = round(out["setup_seconds"] + out["cold"]["seconds"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", action="append", help="a commit to measure (repeatable; default HEAD)")
    parser.add_argument("--work", help="where clones, caches and logs go (default: a new temporary directory)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    commits = [
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", c], capture_output=True, text=True, check=True
        ).stdout.strip()
        for c in (args.commit or ["HEAD"])
    ]
    work = Path(args.work or tempfile.mkdtemp(prefix="epsdpo-main-job-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "runs": [measure(c, work) for c in commits]}
    print(f"machine: {results['machine']}")
    print(
        "| commit | set-up | main job, empty cache | fresh clone total | train loop | eval | main job, warm "
        "| eval, warm | CPU s: set-up / cold / warm |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        cold, warm = r["cold"], r["warm"]
        print(
            f"| {r['commit'][:9]} | {r['setup_seconds']} s | {cold['seconds']} s | {r['fresh_clone_seconds']} s | "
            f"{cold['train_seconds']} s | {cold['eval_seconds']} s | {warm['seconds']} s | {warm['eval_seconds']} s | "
            f"{r['setup_cpu_seconds']} / {cold['cpu_seconds']} / {warm['cpu_seconds']} |"
        )
    for r in results["runs"]:
        for name in ("cold", "warm"):
            f = r[name]
            print(
                f"{r['commit'][:9]} {name}: gain {f['gain']:.4f} ± {f['gain_se']:.4f}, "
                f"held-out accuracy {f['held_out_accuracy']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
