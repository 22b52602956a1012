"""Does alignment-potential selection help at a fixed training budget? (#16; Huang et al. 2025, SPEC §3)

    .venv/bin/python experiments/selection_budget.py                 # every run not yet done, then the report
    .venv/bin/python experiments/selection_budget.py --list          # the plan and what is done
    .venv/bin/python experiments/selection_budget.py --only 'random-*' --max-runs 2
    .venv/bin/python experiments/selection_budget.py --report        # rebuild the report from the summaries only

Every run trains DPO for the same 26 steps of 8 pairs (``selection_budget.yaml``) on pairs chosen by one rule:

- ``alignment_potential``: the 40% with the largest z(explicit margin) − z(implicit margin under π₀);
- ``explicit``: the 40% with the largest explicit margin (the gold reward's spread over the pair's 4 responses);
- ``implicit``: the 40% with the smallest implicit margin (the pairs SmolLM2 separates least);
- ``random``: a random 40% (a different subset for each seed);
- ``none``: all 520 pairs, of which the budget covers 208 (in the seed's order);

then ``epsdpo eval`` of the final model on all 110 held-out prompts × 2 samples and every held-out pair (the same
sampler seed for every run: the rules are compared on the same prompts with common random numbers). Seeds 0, 1, 2
(the seed sets LoRA's initialisation and the data order). One summary per run in
``docs/results/selection_budget/NAME.json``; the report ``docs/results/selection_budget.{md,png}`` is rebuilt from
them alone, so the grid can be completed in parts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _runs import (
    ROOT,
    call,
    commit,
    epsdpo_command,
    fmt,
    grid_main,
    machine,
    mean_se,
    standard_eval,
    train_seconds,
)

from epsdpo.stages.evaluate import SUMMARY_KEYS

CONFIG = Path("experiments/selection_budget.yaml")  # relative to ROOT, as recorded in the commands
RUNS = Path("runs/selection_budget")
RESULTS = ROOT / "docs" / "results"
SUMMARIES = RESULTS / "selection_budget"
SEEDS = (0, 1, 2)
RULES = ("alignment_potential", "explicit", "implicit", "random", "none")
LABELS = {
    "alignment_potential": "alignment potential (40%)",
    "explicit": "explicit margin (40%)",
    "implicit": "implicit margin (40%)",
    "random": "random (40%)",
    "none": "all pairs",
}
EVAL = standard_eval("runs/selection_budget/reference_cache")
EVAL_KEYS = SUMMARY_KEYS
#: the paired comparisons of the report: (rule, against)
COMPARISONS = (("alignment_potential", "random"), ("alignment_potential", "none"), ("alignment_potential", "explicit"))


@dataclass(frozen=True)
class Run:
    rule: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.rule}-s{self.seed}"

    @property
    def overrides(self) -> list[str]:
        return [f"selection={self.rule}", f"seed={self.seed}"]


def plan() -> list[Run]:
    """Seed-major: every rule of seed 0 first, so a partial grid already compares all rules."""
    return [Run(rule, seed) for seed in SEEDS for rule in RULES]


def run_one(run: Run) -> dict[str, Any]:
    """Train (or resume), evaluate and summarise one run; returns the summary written."""
    out = RUNS / run.name
    log = ROOT / out / "experiment.log"
    train_cmd = ["epsdpo", "train", str(CONFIG), *run.overrides, f"output_dir={out}"]
    eval_target = out / "eval-final.json"
    eval_cmd = ["epsdpo", "eval", str(out), *EVAL, f"output={eval_target}"]
    revision, started = commit(), time.perf_counter()
    trained_now = not (ROOT / out / "final").is_dir()
    if trained_now:
        resume = ["resume_from_checkpoint=auto"] if any((ROOT / out).glob("checkpoint-*")) else []
        call([epsdpo_command(), *train_cmd[1:], *resume], log)
    trained = time.perf_counter()
    if not (ROOT / eval_target).is_file():
        call([epsdpo_command(), *eval_cmd[1:]], log)
    evaluated = time.perf_counter()
    summary = summarise(run, ROOT / out, {"train": " ".join(train_cmd), "eval": " ".join(eval_cmd)})
    summary.update(
        commit=revision,
        machine=machine(),
        seconds={
            "train": train_seconds(ROOT / out, trained - started, trained_now),
            "eval": round(evaluated - trained, 1),
        },
    )
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    (SUMMARIES / f"{run.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summarise(run: Run, run_dir: Path, commands: dict[str, str]) -> dict[str, Any]:
    """The run's evaluation, its training curve and what its selection kept (margins of the kept pairs)."""
    ev = json.loads((run_dir / "eval-final.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    selection: dict[str, Any] = {"kept": json.loads((run_dir / "data_report.json").read_text())["kept"]}
    scores = run_dir / "selection_scores.jsonl"
    if scores.is_file():
        rows = [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["selected"]]
        selection["kept"] = len(kept)
        for key in ("explicit_margin", "implicit_margin"):
            values = [r[key] for r in kept if r[key] is not None]
            everything = [r[key] for r in rows if r[key] is not None]
            if values:
                selection[f"mean_{key}_kept"] = sum(values) / len(values)
                selection[f"mean_{key}_all"] = sum(everything) / len(everything)
        selection["rows_kept"] = [r["row"] for r in kept]
    return {
        "name": run.name,
        "rule": run.rule,
        "seed": run.seed,
        "overrides": run.overrides,
        "commands": commands,
        "eval": {k: ev[k] for k in EVAL_KEYS if k in ev},
        "selection": selection,
        "train": {
            "loss": [r["loss"] for r in train],
            "accuracy": [r["rewards/accuracies"] for r in train],
            "margin": [r["rewards/margins"] for r in train],
        },
    }


# ---- the report ---------------------------------------------------------------------------------------------------
def load_summaries() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SUMMARIES.glob("*.json"))]


def per_rule(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rule: mean ± s.e. over seeds of gain, KL, win rate, held-out accuracy (and the seeds present)."""
    out = {}
    for rule in RULES:
        runs = [s for s in summaries if s["rule"] == rule]
        if runs:
            out[rule] = {
                key: mean_se([r["eval"][key] for r in runs])
                for key in ("gold_reward_gain", "kl", "win_rate", "preference_accuracy")
            }
            out[rule]["seeds"] = sorted(r["seed"] for r in runs)
            out[rule]["within"] = statistics_within(runs)
    return out


def statistics_within(runs: list[dict[str, Any]]) -> float:
    """The typical within-run standard error of the gain (over prompts), for comparison with the seed spread."""
    return math.sqrt(sum(r["eval"]["gold_reward_gain_se"] ** 2 for r in runs) / len(runs))


def paired(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per comparison: the same-seed differences of gain and KL, mean ± s.e. over seeds."""
    by = {(s["rule"], s["seed"]): s for s in summaries}
    rows = []
    for a, b in COMPARISONS:
        seeds = [seed for seed in SEEDS if (a, seed) in by and (b, seed) in by]
        gains = [by[a, s]["eval"]["gold_reward_gain"] - by[b, s]["eval"]["gold_reward_gain"] for s in seeds]
        kls = [by[a, s]["eval"]["kl"] - by[b, s]["eval"]["kl"] for s in seeds]
        rows.append({"a": a, "b": b, "seeds": seeds, "gain": mean_se(gains), "kl": mean_se(kls), "diffs": gains})
    return rows


def report(summaries: list[dict[str, Any]]) -> tuple[Path, Path]:
    md, png = RESULTS / "selection_budget.md", RESULTS / "selection_budget.png"
    plot(summaries, png)
    rules = per_rule(summaries)
    machines = sorted({s["machine"] for s in summaries})
    lines = [
        "# Selection at a fixed training budget (issue #16)",
        "",
        "`experiments/selection_budget.py` (rebuilt from `docs/results/selection_budget/*.json`). SmolLM2-135M-"
        "Instruct, LoRA r 16, DPO β 0.1, lr 5e-4 cosine; every run 26 steps × 8 pairs on the pairs one rule "
        "keeps of the 520 bundled on-policy sentiment pairs (40%, or all pairs); evaluated on all 110 held-out "
        "prompts × 2 samples (gold reward gain over the initial model, paired by prompt; KL(π‖π₀); win rate; "
        "held-out preference accuracy on 110 pairs). Mean ± standard error over seeds (n in the table); "
        f"machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines) or '—'}.",
        "",
        "| rule | seeds | gold-reward gain | KL | gain / KL | win rate | held-out accuracy | within-run s.e. (gain) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule, r in rules.items():
        ratio = r["gold_reward_gain"][0] / r["kl"][0] if r["kl"][0] else math.nan
        lines.append(
            f"| {LABELS[rule]} | {','.join(map(str, r['seeds']))} | {fmt(*r['gold_reward_gain'])} | {fmt(*r['kl'])} | "
            f"{ratio:.4f} | {fmt(*r['win_rate'])} | {fmt(*r['preference_accuracy'])} | {r['within']:.3f} |"
        )
    lines += ["", "Same-seed differences (rule − against), mean ± standard error over the seeds both have:", ""]
    lines += ["| comparison | seeds | gain difference | KL difference | per seed (gain) |", "|---|---|---|---|---|"]
    for row in paired(summaries):
        lines.append(
            f"| {LABELS[row['a']]} − {LABELS[row['b']]} | {len(row['seeds'])} | {fmt(*row['gain'])} | "
            f"{fmt(*row['kl'])} | {', '.join(f'{d:+.3f}' for d in row['diffs']) or '—'} |"
        )
    kept = {s["rule"]: s["selection"] for s in summaries if s["seed"] == 0}
    lines += ["", "What each rule kept (seed 0): mean explicit and implicit margins of the kept pairs (all pairs):", ""]
    for rule, sel in kept.items():
        ex, im = sel.get("mean_explicit_margin_kept"), sel.get("mean_implicit_margin_kept")
        lines.append(
            f"- {LABELS[rule]}: {sel['kept']} pairs"
            + ("" if ex is None else f"; explicit {ex:.3f} (all {sel['mean_explicit_margin_all']:.3f})")
            + ("" if im is None else f"; implicit {im:.3f} (all {sel['mean_implicit_margin_all']:.3f})")
        )
    done = {s["name"] for s in summaries}
    todo = [r.name for r in plan() if r.name not in done]
    lines += ["", f"Runs done: {len(done)} of {len(plan())}" + (f"; to do: {', '.join(todo)}." if todo else ".")]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, png


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for i, rule in enumerate(RULES):
        runs = [s for s in summaries if s["rule"] == rule]
        if not runs:
            continue
        xs = [r["eval"]["kl"] for r in runs]
        ys = [r["eval"]["gold_reward_gain"] for r in runs]
        errors = [r["eval"]["gold_reward_gain_se"] for r in runs]
        ax.errorbar(xs, ys, yerr=errors, fmt="o", color=f"C{i}", capsize=3, alpha=0.8, label=LABELS[rule])
    ax.set(xlabel="KL(π‖π₀) (nats)", ylabel="gold-reward gain over π₀", title="26 DPO steps on each rule's pairs")
    ax.grid(alpha=0.3)
    if summaries:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    grid_main(__doc__, "selection", plan, load_summaries, run_one, report)


if __name__ == "__main__":
    main()
