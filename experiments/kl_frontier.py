"""The controlled experiment: gold reward against KL for DPO, ε-DPO, β-DPO and TR-DPO on SmolLM2 (issue #7).

    .venv/bin/python experiments/kl_frontier.py                 # every run not yet done, then the report
    .venv/bin/python experiments/kl_frontier.py --list          # the plan and what is done
    .venv/bin/python experiments/kl_frontier.py --only 'dpo-b0.1-*' --max-runs 2
    .venv/bin/python experiments/kl_frontier.py --report        # rebuild docs/results/kl_frontier.{md,png} only

Each run is ``epsdpo train experiments/kl_frontier.yaml KEY=VALUE…`` into ``runs/kl_frontier/NAME`` followed by
``epsdpo eval runs/kl_frontier/NAME …`` (both as subprocesses, exactly the commands recorded), then a small summary
``docs/results/runs/NAME.json``: the commands, the settings, ``eval.json``'s metrics, the training metrics that matter
(final loss/accuracy, the β trajectory, the shares of s = +1/0/−1) and the wall time. A run whose summary exists is
skipped; an interrupted training resumes from its last checkpoint; a trained run without a summary is only evaluated.
Commit the summaries (the script does not touch git unless ``--commit``): the report is rebuilt from them alone, so
the grid continues on another machine where it stopped.

The plan:

- grid: β ∈ {0.01, 0.05, 0.1, 0.5} × {DPO, ε-DPO (ε = 0.01), β-DPO, TR-DPO} × seeds {0, 1};
- ε ablation: ε-DPO with ε ∈ {0.005, 0.02} at β = 0.1, seed 0 (ε = 0.01 is in the grid);
- decision precision (SPEC §2): ε-DPO at β = 0.1, seed 0, trained with one-rounding bfloat16 decisions (which these
  runs took for the published code's; that is ``decision_precision=published``, see docs/epsilon_dpo.md)
  (``decision_precision=bfloat16``), and, on every ε-DPO β = 0.1 final checkpoint, the shares of s = +1/0/−1 that
  float32 and bfloat16 decisions give on the same training pairs;
- evaluation noise: the seed-1 β = 0.1 DPO and ε-DPO models evaluated again with sampler seeds 1, 2, 3;
- longer training: DPO and ε-DPO at β = 0.1, seed 0, for 64 steps on every bundled pair (512 of the 520 seen once).

What is held fixed for every run is in ``experiments/kl_frontier.yaml`` (model, LoRA, data subset, steps, learning
rate, lengths) and in ``EVAL`` below (prompts, samples, seed): the seed of the evaluation sampler is the same for all
runs, so every policy is compared with the same reference samples.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _runs import ROOT, call, commit, epsdpo_command, machine, reference_text, short_machine

CONFIG = Path("experiments/kl_frontier.yaml")  # relative to ROOT, as recorded in the commands
RUNS = Path("runs/kl_frontier")
RESULTS = ROOT / "docs" / "results"
SUMMARIES = RESULTS / "runs"
BETAS = (0.01, 0.05, 0.1, 0.5)
SEEDS = (0, 1)
METHODS: dict[str, list[str]] = {
    "dpo": ["loss_type=dpo"],
    "epsilon_dpo": ["loss_type=epsilon_dpo", "epsilon=0.01"],
    "beta_dpo": ["loss_type=beta_dpo"],
    "tr_dpo": ["loss_type=dpo", "sync_ref_model=true", "precompute_ref_hidden_states=false"],
}
LABELS = {"dpo": "DPO", "epsilon_dpo": "ε-DPO", "beta_dpo": "β-DPO", "tr_dpo": "TR-DPO"}
#: the subset of the bundled pairs every run trains on (its first TRAIN_PAIRS rows)
TRAIN_PAIRS = 96
EVAL = [
    "eval_dataset=bundled",
    "num_prompts=48",
    "max_pairs=32",
    "samples_per_prompt=1",
    "max_new_tokens=48",
    "batch_size=16",
    "seed=0",
    "disable_tqdm=true",
    f"reference_cache_dir={RUNS / 'eval_reference'}",
]
#: the evalseed group: these methods' seed-1 β = 0.1 models, evaluated again with these sampler seeds (the grid uses 0)
EVALSEED_METHODS = ("dpo", "epsilon_dpo")
EVAL_SEEDS = (1, 2, 3)
#: the long runs' steps: 512 of the 520 bundled pairs, each seen once, at 8 pairs a step
LONG_STEPS = 64
#: training metrics kept in the summary (the last step's value)
FINAL_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "kl/beta", "grad_norm")


@dataclass(frozen=True)
class Run:
    name: str
    group: str  # grid | epsilon | precision | evalseed | long
    method: str
    beta: float
    seed: int
    overrides: list[str] = field(default_factory=list)
    #: evalseed runs: the run whose trained model is evaluated again, and the evaluation's sampler seed
    base: str | None = None
    eval_seed: int = 0
    #: the training data when not the grid's subset (the long runs train on every bundled pair)
    dataset: str | None = None


def plan() -> list[Run]:
    # seed-major, so a partly finished grid already covers every (method, β) once
    runs = [
        Run(f"{m}-b{b:g}-s{s}", "grid", m, b, s, [*METHODS[m], f"beta={b}", f"seed={s}"])
        for s in SEEDS
        for b in BETAS
        for m in METHODS
    ]
    # the ablation and the precision run use seed 0 (compare with the grid's seed-0 ε-DPO run at β = 0.1)
    runs += [
        Run(
            f"epsilon_dpo-b0.1-e{e:g}-s0",
            "epsilon",
            "epsilon_dpo",
            0.1,
            0,
            ["loss_type=epsilon_dpo", f"epsilon={e}", "beta=0.1", "seed=0"],
        )
        for e in (0.005, 0.02)
    ]
    runs.append(
        Run(
            "epsilon_dpo-b0.1-bf16dec-s0",
            "precision",
            "epsilon_dpo",
            0.1,
            0,
            ["loss_type=epsilon_dpo", "epsilon=0.01", "beta=0.1", "decision_precision=bfloat16", "seed=0"],
        )
    )
    # the evaluation's own noise: the seed-1 β = 0.1 DPO and ε-DPO models evaluated again with other sampler seeds
    for base in runs[:]:
        if base.group == "grid" and base.beta == 0.1 and base.seed == 1 and base.method in EVALSEED_METHODS:
            runs += [
                Run(
                    f"{base.name}-evalseed{k}",
                    "evalseed",
                    base.method,
                    base.beta,
                    base.seed,
                    base.overrides,
                    base=base.name,
                    eval_seed=k,
                )
                for k in EVAL_SEEDS
            ]
    # longer training: LONG_STEPS steps on the whole bundled set (512 of 520 pairs seen once), DPO and ε-DPO at β = 0.1
    runs += [
        Run(
            f"{m}-b0.1-long{LONG_STEPS}-s0",
            "long",
            m,
            0.1,
            0,
            [*METHODS[m], "beta=0.1", "seed=0", f"max_steps={LONG_STEPS}", f"save_steps={LONG_STEPS // 2}"],
            dataset="bundled:sentiment_pairs",
        )
        for m in ("dpo", "epsilon_dpo")
    ]
    return runs


def _train_data() -> Path:
    """The first TRAIN_PAIRS rows of the bundled pairs, written once (the same bytes on every machine)."""
    from importlib.resources import files

    path = ROOT / RUNS / f"train_pairs_{TRAIN_PAIRS}.jsonl"
    lines = (files("epsdpo") / "assets" / "data" / "sentiment_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    text = "".join(line + "\n" for line in lines[:TRAIN_PAIRS])
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path.relative_to(ROOT)


def run_one(run: Run) -> dict[str, Any]:
    """Train (or resume), evaluate and summarise one run; returns the summary written."""
    out = RUNS / (run.base or run.name)  # an evalseed run evaluates its base run's model
    (ROOT / out).mkdir(parents=True, exist_ok=True)
    log = ROOT / out / "experiment.log"
    data = run.dataset or _train_data()
    train_cmd = ["epsdpo", "train", str(CONFIG), f"dataset={data}", *run.overrides, f"output_dir={out}"]
    eval_json = out / "eval.json" if run.base is None else out / f"eval-seed{run.eval_seed}.json"
    eval_args = [e if not e.startswith("seed=") else f"seed={run.eval_seed}" for e in EVAL]
    eval_cmd = ["epsdpo", "eval", str(out), *eval_args, *([f"output={eval_json}"] if run.base else [])]
    started = time.perf_counter()
    revision = commit()  # the code that runs (a run resumed later may record a later commit)
    if not (ROOT / out / "final").is_dir():
        resume = ["resume_from_checkpoint=auto"] if any((ROOT / out).glob("checkpoint-*")) else []
        call([epsdpo_command(), *train_cmd[1:], *resume], log)
    trained = time.perf_counter()
    if not (ROOT / eval_json).is_file():
        call([epsdpo_command(), *eval_cmd[1:]], log)
    evaluated = time.perf_counter()
    commands = {"train": " ".join(train_cmd), "eval": " ".join(eval_cmd)}
    summary = summarise(run, ROOT / out, commands, ROOT / eval_json)
    summary["commit"] = revision
    summary["machine"] = machine()
    summary["seconds"] = {"train": round(trained - started, 1), "eval": round(evaluated - trained, 1)}
    if run.method == "epsilon_dpo" and run.beta == 0.1 and run.group != "evalseed":
        summary["decision_precision"] = decision_shares(ROOT / out)
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    (SUMMARIES / f"{run.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summarise(run: Run, run_dir: Path, commands: dict[str, str], eval_json: Path | None = None) -> dict[str, Any]:
    from epsdpo.training.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    ev = json.loads((eval_json or run_dir / "eval.json").read_text(encoding="utf-8"))
    metrics = {k: v for k, v in ev.items() if isinstance(v, int | float)}
    shares = {}
    if "kl/steps_weaker" in records[-1]:
        for key, name in (("kl/steps_weaker", "s=+1"), ("kl/steps_kept", "s=0"), ("kl/steps_stronger", "s=-1")):
            shares[name] = statistics.fmean(r[key] for r in records)
    return {
        "name": run.name,
        "group": run.group,
        "method": run.method,
        "beta": run.beta,
        "seed": run.seed,
        "overrides": run.overrides,
        "commands": commands,
        "eval": metrics,
        **({"base": run.base, "eval_seed": run.eval_seed} if run.base else {}),
        "train": {
            "steps": records[-1]["step"],
            **{k: records[-1][k] for k in FINAL_KEYS if k in records[-1]},
            "beta_trajectory": [r["kl/beta"] for r in records],
            "decision_shares": shares,
        },
    }


def decision_shares(run_dir: Path, pairs: int = 32) -> dict[str, Any]:
    """Shares of s = +1/0/−1 with float32 and with bfloat16 decisions, for the final policy on the same pairs."""
    import torch

    from epsdpo.data import PreferenceCollator, load_preference_dataset
    from epsdpo.logps import DecisionSpec, compute_perturbed_logps
    from epsdpo.losses import perturbation_steps
    from epsdpo.stages.evaluate import EvalConfig
    from epsdpo.stages.evaluate.measure import load_run_models
    from epsdpo.training.config import load_run_config

    cfg = load_run_config(run_dir / "config.yaml")
    loaded = load_run_models(EvalConfig(run_dir=str(run_dir)))
    data, _ = load_preference_dataset(cfg.data, loaded.tokenizer, warn=False)
    collate = PreferenceCollator(loaded.tokenizer.pad_token_id)
    counts: dict[str, list[int]] = {"float32": [0, 0, 0], "bfloat16": [0, 0, 0]}
    with torch.no_grad():
        for start in range(0, min(pairs, len(data)), 4):
            batch = collate(data[start : start + 4])
            ids, attention = batch["input_ids"], batch["attention_mask"]
            labels, mask = ids[:, 1:], batch["completion_mask"][:, 1:]
            pol = loaded.policy(input_ids=ids, attention_mask=attention).logits[:, :-1]
            ref = loaded.reference(input_ids=ids, attention_mask=attention).logits[:, :-1]
            for name in ("float32", "bfloat16"):  # the run's ε and τ in either precision
                spec = DecisionSpec.from_precision(cfg.loss.epsilon, name, cfg.loss.decision_tolerance)
                lp = compute_perturbed_logps(pol, ref, labels, mask, spec)
                s = perturbation_steps(*spec.logratios(lp), tolerance=spec.tolerance)
                for i, value in enumerate((1, 0, -1)):
                    counts[name][i] += int((s == value).sum())
    total = sum(counts["float32"])
    names = ("s=+1", "s=0", "s=-1")
    return {
        "pairs": total,
        **{precision: {k: c / total for k, c in zip(names, n, strict=True)} for precision, n in counts.items()},
    }


# ---- the report ------------------------------------------------------------------------------------------------
def load_summaries() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SUMMARIES.glob("*.json"))]


def _se(ev: dict[str, Any], std_key: str) -> float:
    """Standard error of a per-sample mean whose standard deviation ``eval.json`` holds under ``std_key``."""
    return ev[std_key] / math.sqrt(max(ev.get("num_samples", 1), 1))


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range across seeds (0 for one seed)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def report(summaries: list[dict[str, Any]]) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, png = RESULTS / "kl_frontier.md", RESULTS / "kl_frontier.png"
    done = {s["name"] for s in summaries}
    missing = [r.name for r in plan() if r.name not in done]
    lines = [
        "# Gold reward against KL: DPO, ε-DPO, β-DPO, TR-DPO on SmolLM2-135M-Instruct",
        "",
        "Generated by `experiments/kl_frontier.py` from the run summaries in `docs/results/runs/` (each holds the "
        "exact `epsdpo train` and `epsdpo eval` commands). Do not edit by hand.",
        "",
        _setup_text(),
        "",
        f"Runs done: {len(done)} of {len(plan())}." + (f" Not yet run: {', '.join(missing)}." if missing else ""),
        "",
    ]
    grid = [s for s in summaries if s["group"] == "grid"]
    if grid:
        lines += [
            "## Per method and β (mean over seeds ± half the range across seeds)",
            "",
            "| method | β | seeds | gold reward | KL(π‖π_ref) | win rate | pref. acc. | β at the last step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            for beta in BETAS:
                rows = [s for s in grid if s["method"] == method and s["beta"] == beta]
                if not rows:
                    continue
                cells = []
                for key in ("policy/gold_reward", "kl", "win_rate", "preference_accuracy"):
                    m, h = _mean_spread([s["eval"][key] for s in rows])
                    cells.append(f"{m:.3f} ± {h:.3f}")
                fb = _mean_spread([s["train"]["kl/beta"] for s in rows])[0]
                lines.append(f"| {LABELS[method]} | {beta:g} | {len(rows)} | " + " | ".join(cells) + f" | {fb:.4g} |")
        lines += [
            "",
            "Per method over every β and seed (mean ± standard error over the runs):",
            "",
            "| method | runs | gold reward | KL(π‖π_ref) | win rate |",
            "|---|---|---|---|---|",
        ]
        for method in METHODS:
            rows = [s for s in grid if s["method"] == method]
            if len(rows) > 1:
                cells = []
                for key in ("policy/gold_reward", "kl", "win_rate"):
                    values = [s["eval"][key] for s in rows]
                    se = statistics.stdev(values) / math.sqrt(len(values))
                    cells.append(f"{statistics.fmean(values):.3f} ± {se:.3f}")
                lines.append(f"| {LABELS[method]} | {len(rows)} | " + " | ".join(cells) + " |")
        lines += ["", *_reference_text([s for s in summaries if s["group"] != "evalseed"]), ""]
        moved = [
            abs(s["train"]["kl/beta"] / s["beta"] - 1)
            for s in summaries
            if s["method"] == "epsilon_dpo" and s["group"] in ("grid", "epsilon", "precision")
        ]
        if moved:
            lines += [
                f"ε-DPO's global β moved by at most {100 * max(moved):.2f}% from β₀ in these runs (a step "
                "changes it by a factor between 1/(1+ε) and 1/(1−ε)), and a pair's β̃ differs from β by a "
                "factor 1/(1±ε): in runs this short ε-DPO trains almost exactly like DPO at the same β, so "
                "differences between the two are mostly the sampling noise of the evaluation (compare them "
                "with the s.e. column and the spread across seeds).",
                "",
            ]
    lines += [
        "## Every run",
        "",
        "| run | method | β | ε | seed | gold reward ± s.e. | KL ± s.e. | win rate | pref. acc. | "
        "β at the last step | s=+1 / 0 / −1 | train s | eval s | machine |",
        "|---" * 14 + "|",
    ]
    for s in (s for s in summaries if s["group"] != "evalseed"):
        eps = next((o.split("=")[1] for o in s["overrides"] if o.startswith("epsilon=")), "")
        lines.append(
            f"| {s['name']} | {LABELS[s['method']]} | {s['beta']:g} | {eps} | {s['seed']} | {_result_cells(s)} | "
            f"{s['seconds']['train']:.0f} | {s['seconds']['eval']:.0f} | {short_machine(s)} |"
        )
    precision = [s for s in summaries if "decision_precision" in s]
    if precision:
        lines += [
            "",
            "## Decision precision (SPEC §2): float32 vs bfloat16 decisions on the same final checkpoints",
            "",
            "`bfloat16` here is the one-rounding regime (float32 mixtures rounded once), which these runs called the "
            "published code's decisions; it is not: the published trainer's order of bf16 operations is "
            "`decision_precision=published`, measured in docs/epsilon_dpo.md "
            "(`experiments/decision_precision.py`).",
            "",
            "| run (trained with) | pairs | float32 s=+1 / 0 / −1 | bfloat16 s=+1 / 0 / −1 | β at the last step |",
            "|---|---|---|---|---|",
        ]
        for s in precision:
            d = s["decision_precision"]
            lines.append(
                f"| {s['name']} | {d['pairs']} | {_shares_text(d['float32'])} | "
                f"{_shares_text(d['bfloat16'])} | {s['train']['kl/beta']:.4g} |"
            )
    lines += _paired_text(summaries)
    lines += _long_text(summaries)
    lines += _noise_text(summaries)
    lines += [
        "",
        "## Commands",
        "",
        "```",
        *(f"{s['commands']['train']}\n{s['commands']['eval']}" for s in summaries),
        "```",
        "",
    ]
    md.write_text("\n".join(lines), encoding="utf-8")
    plot(summaries, png)
    return md, png


def _shares_text(shares: dict[str, float]) -> str:
    """``s=+1 / 0 / −1`` shares as ``0.42 / 0.25 / 0.33``; empty for a run without decisions."""
    return " / ".join(f"{shares[k]:.2f}" for k in ("s=+1", "s=0", "s=-1")) if shares else ""


def _result_cells(summary: dict[str, Any]) -> str:
    """A run's table cells: gold reward ± s.e. | KL ± s.e. | win rate | pref. acc. | β at the last step | shares."""
    ev, tr = summary["eval"], summary["train"]
    return (
        f"{ev['policy/gold_reward']:.3f} ± {_se(ev, 'policy/gold_reward_std'):.3f} | {ev['kl']:.3f} ± "
        f"{_se(ev, 'kl/std'):.3f} | {ev['win_rate']:.3f} | {ev['preference_accuracy']:.3f} | "
        f"{tr['kl/beta']:.4g} | {_shares_text(tr.get('decision_shares') or {})}"
    )


def _paired_text(summaries: list[dict[str, Any]]) -> list[str]:
    """ε-DPO minus DPO on the same β and seed (the same data order and initialisation), and the mean over the grid."""
    runs = {(s["method"], s["beta"], s["seed"]): s for s in summaries if s["group"] == "grid"}
    grid = {key: s["eval"] for key, s in runs.items()}
    keys = [(b, sd) for b in BETAS for sd in SEEDS if ("dpo", b, sd) in grid and ("epsilon_dpo", b, sd) in grid]
    if not keys:
        return []
    metrics = (("policy/gold_reward", "gold reward"), ("kl", "KL"), ("win_rate", "win rate"))
    lines = [
        "",
        "## ε-DPO against DPO, same β and seed",
        "",
        "Each row: the ε-DPO run minus the DPO run with the same β, seed, data order and initialisation.",
        "",
        "| β | seed | Δ gold reward | Δ KL | Δ win rate | machines |",
        "|---|---|---|---|---|---|",
    ]
    diffs: dict[str, list[float]] = {key: [] for key, _ in metrics}
    for b, sd in keys:
        row = []
        for key, _ in metrics:
            d = grid[("epsilon_dpo", b, sd)][key] - grid[("dpo", b, sd)][key]
            diffs[key].append(d)
            row.append(f"{d:+.3f}")
        pair = [short_machine(runs[(m, b, sd)]) for m in ("dpo", "epsilon_dpo")]
        row.append("same" if pair[0] == pair[1] and pair[0] else " / ".join(m or "unknown" for m in pair))
        lines.append(f"| {b:g} | {sd} | " + " | ".join(row) + " |")
    if len(keys) > 1:
        se = {key: statistics.stdev(v) / math.sqrt(len(v)) for key, v in diffs.items()}
        text = ", ".join(f"{name} {statistics.fmean(diffs[key]):+.3f} ± {se[key]:.3f}" for key, name in metrics)
        lines += ["", f"Mean over the {len(keys)} pairs of runs ± standard error: {text}."]
    return lines


def _long_text(summaries: list[dict[str, Any]]) -> list[str]:
    """DPO and ε-DPO trained for a whole epoch of the bundled pairs: does β move, and do the two separate?"""
    runs = {s["method"]: s for s in summaries if s["group"] == "long"}
    if not runs:
        return []
    lines = [
        "",
        f"## Longer training: {LONG_STEPS} steps on every bundled pair (β₀ = 0.1, seed 0)",
        "",
        f"{LONG_STEPS} steps of 8 pairs see {8 * LONG_STEPS} of the 520 bundled training pairs once; everything "
        "else as in the grid.",
        "",
        "| run | gold reward ± s.e. | KL ± s.e. | win rate | pref. acc. | β at the last step | s=+1 / 0 / −1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("dpo", "epsilon_dpo"):
        if method in runs:
            lines.append(f"| {runs[method]['name']} | {_result_cells(runs[method])} |")
    if "epsilon_dpo" in runs:
        s = runs["epsilon_dpo"]
        final, change = s["train"]["kl/beta"], 100 * (s["train"]["kl/beta"] / s["beta"] - 1)
        lines += [
            "",
            f"ε-DPO's β went from {s['beta']:g} to {final:.4g} ({change:+.1f}%) over {s['train']['steps']} steps.",
        ]
    return lines


def _noise_text(summaries: list[dict[str, Any]]) -> list[str]:
    """Models evaluated with several sampler seeds: how much of a difference between runs is evaluation noise."""
    by_name = {s["name"]: s for s in summaries}
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        if s["group"] == "evalseed" and s["base"] in by_name:
            groups.setdefault(s["base"], [by_name[s["base"]]]).append(s)
    if not groups:
        return []
    seeds_text = ", ".join(map(str, EVAL_SEEDS))
    lines = [
        "",
        "## Evaluation noise: the same model, other sampler seeds",
        "",
        "Each model below was trained once and evaluated with the grid's sampler seed (0) and with the seeds "
        f"{seeds_text} (everything else as in the grid; the reference is sampled with the same seed as the "
        "policy). Mean ± standard deviation across the evaluation seeds:",
        "",
        "| model | evaluations | gold reward | KL(π‖π_ref) | win rate | reference gold reward |",
        "|---|---|---|---|---|---|",
    ]
    for base, rows in sorted(groups.items()):
        cells = []
        for key in ("policy/gold_reward", "kl", "win_rate", "reference/gold_reward"):
            values = [s["eval"][key] for s in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f}")
        lines.append(f"| {base} | {len(rows)} | " + " | ".join(cells) + " |")
    bases = sorted(groups)
    if len(bases) == 2:  # the paired difference, seed by seed
        seeds = {b: {s.get("eval_seed", 0): s["eval"] for s in groups[b]} for b in bases}
        common = sorted(set(seeds[bases[0]]) & set(seeds[bases[1]]))
        if len(common) > 1:
            method = {base: by_name[base]["method"] for base in bases}
            a, b = sorted(bases, key=lambda base: method[base] == "dpo")  # ε-DPO (or the other method) − DPO
            diffs = {key: [seeds[a][k][key] - seeds[b][k][key] for k in common] for key in ("policy/gold_reward", "kl")}
            named = (("gold reward", diffs["policy/gold_reward"]), ("KL", diffs["kl"]))
            text = ", ".join(f"{name} {statistics.fmean(v):+.3f} ± {statistics.stdev(v):.3f}" for name, v in named)
            lines += ["", f"{a} − {b}, evaluation seed by seed ({len(common)} seeds, mean ± sd): {text}."]
    return lines


def _reference_text(summaries: list[dict[str, Any]]) -> list[str]:
    """The reference's gold reward (of the run's one evaluation), and which runs share which reference samples."""
    return reference_text(
        summaries,
        lambda s: s["eval"]["reference/gold_reward"],
        "Win rates across such groups differ by this sampling noise too; gold reward and KL come from each "
        "policy's own samples, so they do not depend on the reference's samples, but they move with the machine "
        "in the same way.",
    )


def _setup_text() -> str:
    import yaml

    y = yaml.safe_load((ROOT / CONFIG).read_text(encoding="utf-8"))
    settings = " ".join(e for e in EVAL if not e.startswith(("disable", "reference")))
    pairs = y["per_device_train_batch_size"] * y["gradient_accumulation_steps"]
    return (
        f"Setting: SmolLM2-135M-Instruct, LoRA r {y['lora_r']} (the same for every method; `{CONFIG}`), "
        f"{y['max_steps']} float32 steps of {pairs} pairs at learning rate {y['learning_rate']:g} (cosine), rows "
        f"of at most {y['max_length']} tokens (prompt ≤ {y['max_prompt_length']}), "
        f"TR-DPO α {y['ref_model_mixup_alpha']} every {y['ref_model_sync_steps']} steps, trained on the first "
        f"{TRAIN_PAIRS} pairs of the bundled on-policy sentiment pairs (`bundled:sentiment_pairs`); evaluated with "
        f"`epsdpo eval` ({settings}) on held-out prompts: gold "
        "reward = VADER compound score of one sampled response per prompt, KL(π‖π_ref) = mean sequence "
        "log-ratio of the policy's own samples, win rate against the reference's samples (ties ½), preference "
        "accuracy on held-out pairs. s.e. = standard deviation of the per-sample values / √n."
    )


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"dpo": "o", "epsilon_dpo": "*", "beta_dpo": "s", "tr_dpo": "^"}
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    grid = [s for s in summaries if s["group"] == "grid"]
    ref = statistics.fmean(s["eval"]["reference/gold_reward"] for s in grid) if grid else 0.0
    for i, method in enumerate(METHODS):
        rows = [s for s in grid if s["method"] == method]
        if not rows:
            continue
        kl = [s["eval"]["kl"] for s in rows]
        reward = [s["eval"]["policy/gold_reward"] for s in rows]
        ax.scatter(
            kl,
            reward,
            marker=markers[method],
            s=80 if method == "epsilon_dpo" else 45,
            color=f"C{i}",
            label=LABELS[method],
            alpha=0.85,
        )
        for s in rows:
            ax.annotate(
                f"{s['beta']:g}",
                (s["eval"]["kl"], s["eval"]["policy/gold_reward"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 3),
                color=f"C{i}",
            )
        front = pareto_front([(0.0, ref), *zip(kl, reward, strict=True)])  # every frontier starts at π_ref
        ax.plot([p[0] for p in front], [p[1] for p in front], color=f"C{i}", linewidth=1.2, alpha=0.8)
    if grid:
        ax.plot(0.0, ref, marker="P", markersize=11, color="black", linestyle="none", label="reference")
    ax.set(
        xlabel="KL(π ‖ π_ref) from the policy's samples (nats)",
        ylabel="mean gold reward (VADER) of samples",
        title="Reward vs KL, every run (labels: β; lines: each method's frontier from π_ref)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower KL and higher reward), by increasing KL."""
    front: list[tuple[float, float]] = []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or reward > front[-1][1]:
            front.append((kl, reward))
    return front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="*", help="run names matching this glob (default: all)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--list", action="store_true", help="print the plan and what is done")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the summaries")
    parser.add_argument("--commit", action="store_true", help="git-commit each new summary and the report")
    args = parser.parse_args()
    os.chdir(ROOT)  # the recorded commands and the runs' configs use paths relative to the repository root
    done = {s["name"] for s in load_summaries()}
    todo = [r for r in plan() if fnmatch.fnmatch(r.name, args.only) and r.name not in done]
    if args.list:
        for r in plan():
            print(f"{'done' if r.name in done else 'todo'}  {r.name}")
        return
    if not args.report:
        for i, run in enumerate(todo[: args.max_runs]):
            print(f"[{i + 1}/{len(todo)}] {run.name} ...", flush=True)
            summary = run_one(run)
            ev = summary["eval"]
            print(
                f"    reward {ev['policy/gold_reward']:.3f} (ref {ev['reference/gold_reward']:.3f}), "
                f"KL {ev['kl']:.3f}, win {ev['win_rate']:.3f}, {summary['seconds']}",
                flush=True,
            )
            if args.commit:
                md, png = report(load_summaries())
                files = [str(SUMMARIES / f"{run.name}.json"), str(md), str(png)]
                subprocess.run(["git", "add", *files], cwd=ROOT, check=True)
                subprocess.run(["git", "commit", "-q", "-m", f"kl_frontier: run {run.name}"], cwd=ROOT, check=True)
    md, png = report(load_summaries())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
