"""Print the README's main-job figures from finished runs: one row per run, then the first held-out prompts.

    .venv/bin/python scripts/summarise_main_job.py runs/seed0 runs/seed1 runs/seed2 [--examples 3]

Reads each run's latest evaluation (``RUN_DIR/eval.json``) and, for the side-by-side examples, the samples file
of the first run: the first ``--examples`` held-out prompts in the file's order (sample 0 of each), not chosen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path) -> str:
    ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    seed = json.loads((run / "final" / "final_metrics.json").read_text(encoding="utf-8")).get("step")
    gain, se = ev["gold_reward_gain"], ev["gold_reward_gain_se"]
    lo, hi = ev["gold_reward_gain_ci95"]
    d2 = ev["policy/distinct_2"] / ev["reference/distinct_2"]
    return (
        f"| {run.name} | {ev['policy/gold_reward']:.3f} ± {ev['policy/gold_reward_se']:.3f} | "
        f"{ev['reference/gold_reward']:.3f} ± {ev['reference/gold_reward_se']:.3f} | {gain:.3f} ± {se:.3f} "
        f"({gain / se:.1f} s.e.; 95% CI {lo:.3f}…{hi:.3f}) | {ev['preference_accuracy']:.3f} ± "
        f"{ev['preference_accuracy_se']:.3f} (n {ev['num_pairs']}) | {ev['kl']:.1f} ± {ev['kl_se']:.1f} | "
        f"{ev['win_rate']:.3f} ± {ev['win_rate_se']:.3f} | {ev['policy/distinct_2']:.3f} / "
        f"{ev['reference/distinct_2']:.3f} ({d2:.2f}×) | {ev['policy/one_token_repeated']} | {seed} |"
    )


def examples(run: Path, count: int) -> list[str]:
    ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    lines = [json.loads(x) for x in (run / ev["samples_file"]).read_text(encoding="utf-8").splitlines() if x]
    out = ["| prompt | reference (reward) | policy (reward) |", "|---|---|---|"]
    for rec in [r for r in lines if r["sample"] == 0][:count]:

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        out.append(
            f"| {cell(rec['prompt'])} | {cell(rec['reference'])} ({rec['reference_reward']:.2f}) | "
            f"{cell(rec['policy'])} ({rec['policy_reward']:.2f}) |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=3)
    args = parser.parse_args()
    print(
        "| run | policy gold reward | reference gold reward | paired gain | held-out preference accuracy | "
        "KL(π‖π_ref) | win rate | distinct-2 policy / reference | one token repeated | steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run))
    first = json.loads((args.runs[0] / "eval.json").read_text(encoding="utf-8"))
    print(
        f"\n{first['num_prompts']} held-out prompts × {first['samples_per_prompt']} samples per model; "
        f"machine: {first.get('machine')}\n"
    )
    print("\n".join(examples(args.runs[0], args.examples)))


if __name__ == "__main__":
    main()
