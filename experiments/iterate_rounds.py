"""Three rounds of on-policy alignment: alignment-potential selection against random selection (#16).

    .venv/bin/python experiments/iterate_rounds.py                 # every run not yet done, then the report
    .venv/bin/python experiments/iterate_rounds.py --list          # the plan and what is done
    .venv/bin/python experiments/iterate_rounds.py --report        # rebuild the report from the summaries only

Each run is ``epsdpo iterate`` with the bundled iterate config (SmolLM2-135M-Instruct with LoRA, ε-DPO, 3 rounds of
~173 new prompts × 4 samples, the round's policy as its reference, each round evaluated against the original model
on all 110 held-out prompts × 2 samples) and one selection rule: ``alignment_potential`` (w = 2.5, the self-play
weighting of Huang et al. 2025) or ``random``, both keeping 40% of each round's pairs; seeds 0 and 1. A killed run
continues where it stopped (iterate resumes stage by stage). One summary per finished run in
``docs/results/iterate_rounds/NAME.json``; the report ``docs/results/iterate_rounds.{md,png}`` is rebuilt from them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _runs import ROOT, call, commit, epsdpo_command, fmt, grid_main, machine, mean_se

RUNS = Path("runs/iterate_rounds")
RESULTS = ROOT / "docs" / "results"
SUMMARIES = RESULTS / "iterate_rounds"
SEEDS = (0, 1)
RULES = ("alignment_potential", "random")
LABELS = {"alignment_potential": "alignment potential (w 2.5)", "random": "random"}
#: every evaluation of a round: common random numbers across runs, no KL(π_ref‖π) pass
COMMON = [
    "disable_tqdm=true",
    "round_eval={samples_per_prompt: 2, batch_size: 32, forward_kl: false, "
    "reference_cache_dir: runs/iterate_rounds/reference_cache}",
]
KEYS = ("gold_reward_gain", "kl", "win_rate", "preference_accuracy", "policy/distinct_2")
#: per round, what the round's data and selection looked like: (stage, key)
DATA_KEYS = (
    ("generate", "mean_score"),
    ("select", "mean_explicit_margin_kept"),
    ("select", "mean_explicit_margin_all"),
    ("select", "mean_implicit_margin_kept"),
    ("select", "mean_implicit_margin_all"),
)
#: one line style per seed in the figure
LINESTYLES = ("-", "--", ":")
#: policy samples kept per round in a summary, to show what a gold reward means in text
EXAMPLES = 3


@dataclass(frozen=True)
class Run:
    rule: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.rule}-s{self.seed}"

    @property
    def overrides(self) -> list[str]:
        return [f"selection={self.rule}", f"seed={self.seed}", *COMMON]


def plan() -> list[Run]:
    return [Run(rule, seed) for seed in SEEDS for rule in RULES]


def run_one(run: Run) -> dict[str, Any]:
    out = RUNS / run.name
    log = ROOT / out / "experiment.log"
    cmd = ["epsdpo", "iterate", *run.overrides, f"output_dir={out}"]
    revision, started = commit(), time.perf_counter()
    call([epsdpo_command(), *cmd[1:]], log)
    full = json.loads((ROOT / out / "summary.json").read_text(encoding="utf-8"))
    summary = {
        "name": run.name,
        "rule": run.rule,
        "seed": run.seed,
        "command": " ".join(cmd),
        "commit": revision,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "rounds": full["rounds"],
        "examples": examples(ROOT / out),
    }
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    (SUMMARIES / f"{run.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def examples(run_dir: Path, n: int = EXAMPLES) -> list[list[dict[str, Any]]]:
    """Per round, the policy's first ``n`` evaluation samples (prompt, response, gold reward), from eval_samples."""
    out = []
    r = 1
    while (path := run_dir / f"round-{r}" / "eval_samples.jsonl").is_file():
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(n), strict=False)]
        out.append([{"prompt": x["prompt"], "response": x["policy"], "reward": x["policy_reward"]} for x in rows])
        r += 1
    return out


def load_summaries() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SUMMARIES.glob("*.json"))]


def by_round(
    summaries: list[dict[str, Any]], rule: str, key: str, stage: str = "evaluate"
) -> list[tuple[float, float, int]]:
    """Per round: mean ± s.e. over seeds of a stage's key (the evaluation's by default), and the number of seeds."""
    runs = [s for s in summaries if s["rule"] == rule]
    rounds = max((len(s["rounds"]) for s in runs), default=0)
    out = []
    for i in range(rounds):
        stages = [s["rounds"][i].get(stage, {}) for s in runs if len(s["rounds"]) > i]
        values = [st[key] for st in stages if st.get(key) is not None]  # random: no implicit margins computed
        out.append((*mean_se(values), len(values)))
    return out


def paired_by_round(summaries: list[dict[str, Any]], key: str) -> list[tuple[float, float, list[float]]]:
    """Per round: alignment potential − random of the same seed, mean ± s.e. over seeds."""
    by = {(s["rule"], s["seed"]): s for s in summaries}
    seeds = [seed for seed in SEEDS if ("alignment_potential", seed) in by and ("random", seed) in by]
    rounds = min((len(by[r, s]["rounds"]) for s in seeds for r in RULES), default=0)
    out = []
    for i in range(rounds):
        diffs = [
            by["alignment_potential", s]["rounds"][i]["evaluate"][key] - by["random", s]["rounds"][i]["evaluate"][key]
            for s in seeds
        ]
        out.append((*mean_se(diffs), diffs))
    return out


def report(summaries: list[dict[str, Any]]) -> tuple[Path, Path]:
    md, png = RESULTS / "iterate_rounds.md", RESULTS / "iterate_rounds.png"
    plot(summaries, png)
    machines = sorted({s["machine"] for s in summaries})
    lines = [
        "# Iterative on-policy rounds: alignment-potential against random selection (issue #16)",
        "",
        "`experiments/iterate_rounds.py` (rebuilt from `docs/results/iterate_rounds/*.json`): `epsdpo iterate` with "
        "the bundled iterate config (SmolLM2-135M-Instruct, LoRA r 16, ε-DPO β₀ 0.1 ε 0.01, 3 rounds of ~173 new "
        "prompts × 4 samples, 40% of each round's pairs kept, the round's policy as its reference); every round's "
        "policy evaluated against the original model on all 110 held-out prompts × 2 samples. Mean ± standard "
        f"error over seeds; machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines) or '—'}.",
        "",
        "| rule | round | seeds | gold-reward gain | KL | win rate | held-out accuracy | distinct-2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        columns = [by_round(summaries, rule, key) for key in KEYS]
        for i, cells in enumerate(zip(*columns, strict=True)):
            lines.append(
                f"| {LABELS[rule]} | {i + 1} | {cells[0][2]} | " + " | ".join(fmt(m, se) for m, se, _ in cells) + " |"
            )
    ceilings = gain_ceilings(summaries)
    if ceilings:
        lines += [
            "",
            "The gain cannot exceed 1 − the original's mean gold reward (the gold reward is at most 1; each seed's "
            "evaluation draws its own samples of the original, the same for both rules): "
            + ", ".join(f"{c:.3f} (seed {seed})" for seed, c in sorted(ceilings.items()))
            + ". A gain near it means nearly every sample of the policy scores near 1.",
        ]
    original = {s["seed"]: s["rounds"][0]["evaluate"]["reference/distinct_2"] for s in summaries if s["rounds"]}
    if original:
        shown = ", ".join(f"{v:.3f} (seed {seed})" for seed, v in sorted(original.items()))
        lines += ["", f"distinct-2 of the original model's samples: {shown}."]
    lines += [
        "",
        "Each round's data (mean ± s.e. over seeds): the mean gold reward of the samples the round's policy drew "
        "for training, and the mean explicit margin (best − worst score) and implicit margin (|mean-token log-ratio| "
        "under the round's initial policy) of the kept pairs and of all pairs.",
        "",
        "| rule | round | mean score of the samples | explicit margin, kept / all | implicit margin, kept / all |",
        "|---|---|---|---|---|",
    ]
    for rule in RULES:
        columns = [by_round(summaries, rule, key, stage) for stage, key in DATA_KEYS]
        for i, (score, ex_kept, ex_all, im_kept, im_all) in enumerate(zip(*columns, strict=True)):
            lines.append(
                f"| {LABELS[rule]} | {i + 1} | {fmt(*score[:2])} | {fmt(*ex_kept[:2])} / {fmt(*ex_all[:2])} | "
                f"{fmt(*im_kept[:2])} / {fmt(*im_all[:2])} |"
            )
    lines += ["", "Alignment potential − random, same seed, per round (mean ± s.e. over seeds; per seed):", ""]
    lines += ["| round | gain difference | KL difference |", "|---|---|---|"]
    gains, kls = paired_by_round(summaries, "gold_reward_gain"), paired_by_round(summaries, "kl")
    for i, (g, k) in enumerate(zip(gains, kls, strict=True)):
        lines.append(
            f"| {i + 1} | {fmt(g[0], g[1])} ({', '.join(f'{d:+.3f}' for d in g[2])}) | "
            f"{fmt(k[0], k[1])} ({', '.join(f'{d:+.2f}' for d in k[2])}) |"
        )
    shown = [s for s in summaries if s.get("examples")]
    if shown:
        lines += ["", "What the policies write: each round's first evaluation samples (gold reward in brackets).", ""]
    for s in shown:
        for i, samples in enumerate(s["examples"]):
            lines.append(f"- {s['name']}, round {i + 1}:")
            lines += [f"  - [{x['reward']:+.3f}] {json.dumps(x['response'], ensure_ascii=False)}" for x in samples]
    done = {s["name"] for s in summaries}
    todo = [r.name for r in plan() if r.name not in done]
    lines += ["", f"Runs done: {len(done)} of {len(plan())}" + (f"; to do: {', '.join(todo)}." if todo else ".")]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, png


def gain_ceilings(summaries: list[dict[str, Any]]) -> dict[int, float]:
    """Per seed, the largest possible gain: 1 (the gold reward's maximum) − the original model's mean gold reward.

    The evaluation's sampler seed is the run's seed: both rules of a seed score the same samples of the original."""
    return {s["seed"]: 1.0 - s["rounds"][0]["evaluate"]["reference/gold_reward"] for s in summaries if s["rounds"]}


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    ceilings = gain_ceilings(summaries)
    for ax, (key, label) in zip(
        axes[:2], (("gold_reward_gain", "gold-reward gain"), ("kl", "KL(π‖original)")), strict=True
    ):
        for i, rule in enumerate(RULES):
            rows = by_round(summaries, rule, key)
            if rows:
                xs = [0, *range(1, len(rows) + 1)]
                ys = [0.0, *(m for m, _, _ in rows)]
                errors = [0.0, *(0.0 if se != se else se for _, se, _ in rows)]
                ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{i}", label=LABELS[rule])
        ax.set(xlabel="round", ylabel=label, title=f"{label} per round (mean over seeds ± s.e.)")
        ax.set_xticks(range(0, 1 + max((len(s["rounds"]) for s in summaries), default=0)))
    ax = axes[2]  # the path in reward vs KL: every seed's rounds, the original model at the origin
    for i, rule in enumerate(RULES):
        for j, run in enumerate(s for s in summaries if s["rule"] == rule):
            evals = [r["evaluate"] for r in run["rounds"]]
            ax.plot(
                [0.0, *(e["kl"] for e in evals)],
                [0.0, *(e["gold_reward_gain"] for e in evals)],
                marker="o",
                color=f"C{i}",
                alpha=0.8,
                linestyle=LINESTYLES[j % len(LINESTYLES)],
                label=f"{LABELS[rule]}, seed {run['seed']}",
            )
    ax.set(xlabel="KL(π‖original), nats", ylabel="gold-reward gain", title="gain against KL, rounds 0–3 per seed")
    for ax in axes[[0, 2]]:
        for j, (seed, c) in enumerate(sorted(ceilings.items())):
            style = LINESTYLES[j % len(LINESTYLES)]
            ax.axhline(c, color="grey", linestyle=style, linewidth=0.8, label=f"ceiling, seed {seed}")
    for ax in axes:
        ax.grid(alpha=0.3)
        if summaries:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    grid_main(__doc__, "iterate", plan, load_summaries, run_one, report)


if __name__ == "__main__":
    main()
