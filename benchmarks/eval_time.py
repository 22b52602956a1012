"""Wall time of ``epsdpo eval`` on the default evaluation's protocol, before and after issue #33's changes.

    .venv/bin/python benchmarks/eval_time.py --before-src /path/to/old/checkout/src --num-prompts 32

Runs, one after the other, each in its own process with the given source tree first on ``PYTHONPATH``:

1. ``before``: the evaluation of the code in ``--before-src`` (no reference cache: it had none by default);
2. ``after, cold cache``: this checkout's code with an empty reference cache directory;
3. ``after, warm cache``: the same command again, which reads the reference's part from the cache.

Each is SmolLM2-135M-Instruct evaluated against itself (policy = reference: the same sampling and scoring work as
a trained policy's evaluation) with the default's settings (2 samples per prompt and model, 48 new tokens, batch
size 32, the bundled held-out pairs), on the first ``--num-prompts`` held-out prompts and as many pairs. Prints one
JSON line per run (wall and CPU seconds of the whole command, the evaluation's own ``seconds``, and its
figures' agreement with the first run) and a summary. A run's own evaluation after training (``epsdpo train``)
also takes the held-out pairs from the trainer's pass, which this standalone command cannot show.
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

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("policy/gold_reward", "reference/gold_reward", "kl", "kl/forward", "win_rate", "preference_accuracy")


def run(src: Path, args: list[str], out: Path, cache: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "epsdpo.cli", "eval", *args, f"output={out}", "disable_tqdm=true"]
    if cache is not None:
        command.append(f"reference_cache_dir={cache}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(out.read_text(encoding="utf-8"))
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # less sensitive than wall time to other jobs on a shared machine
        "eval_s": round(result["seconds"], 1),
        "figures": {k: result[k] for k in FIGURES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-src", type=Path, required=True, help="the src/ of the code to compare against")
    parser.add_argument("--num-prompts", type=int, default=32, help="held-out prompts (and pairs); the default: 110")
    a = parser.parse_args()
    args = [
        "model=smollm2-135m-instruct",
        "ref_model=smollm2-135m-instruct",
        "eval_dataset=bundled",
        f"num_prompts={a.num_prompts}",
        f"max_pairs={a.num_prompts}",
        "samples_per_prompt=2",
        "max_new_tokens=48",
        "batch_size=32",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        rows = {
            "before": run(a.before_src, args, tmp_path / "before.json", None),
            "after, cold cache": run(ROOT / "src", args, tmp_path / "cold.json", tmp_path / "cache"),
            "after, warm cache": run(ROOT / "src", args, tmp_path / "warm.json", tmp_path / "cache"),
        }
    base = rows["before"]
    for name, row in rows.items():
        same = {k: abs(row["figures"][k] - base["figures"][k]) for k in FIGURES}
        shown = {k: row[k] for k in ("wall_s", "cpu_s", "eval_s")}
        print(json.dumps({"run": name, **shown, "abs_diff_vs_before": same}))
    for name in ("after, cold cache", "after, warm cache"):
        wall, cpu = rows[name]["wall_s"] / base["wall_s"], rows[name]["cpu_s"] / base["cpu_s"]
        print(f"{name}: {wall:.2f}x the wall time, {cpu:.2f}x the CPU time of before")


if __name__ == "__main__":
    main()
