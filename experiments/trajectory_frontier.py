"""What does ε-DPO add over DPO? Reward-vs-KL trajectories, with the controls that isolate its two effects (#15).

    .venv/bin/python experiments/trajectory_frontier.py                # every run not yet done, then the report
    .venv/bin/python experiments/trajectory_frontier.py --list         # the plan and what is done
    .venv/bin/python experiments/trajectory_frontier.py --only 'dpo-s*' --max-runs 2
    .venv/bin/python experiments/trajectory_frontier.py --report       # rebuild the report from the summaries only
    .venv/bin/python experiments/trajectory_frontier.py --jobs 12 --seeds 0,1,2,3,4   # a GPU machine: 12 at once

ε-DPO changes two things at once: its global β drifts (β ← β / (1 + ε·mean s)) and every pair gets its own
β̃ = β / (1 + ε s). The methods here separate them, each trained 64 steps at β₀ = 0.1 and evaluated every 8 steps
(``epsdpo eval RUN checkpoint=N``: all 110 held-out prompts × 2 independent samples per model, every held-out pair),
so each run traces its own reward-vs-KL trajectory instead of one point:

- ``dpo``: DPO at the fixed β₀;
- ``eps``: ε-DPO, ε = 0.01, float32 decisions (the exact rule);
- ``eps_published``: ε-DPO with the published trainer's bf16 order of operations for its decisions;
- ``dpo_on_eps_beta``: DPO with the global β replayed step by step from the same seed's ``eps`` run
  (``beta_schedule``, written from that run's committed summary): ε-DPO's drift without its per-pair β̃;
- ``eps_frozen``: ε-DPO's per-pair β̃ with the global β held at β₀ (``freeze_global_beta``): the per-pair effect alone;
- ``beta_dpo`` and ``tr_dpo``: the other adaptive baselines;
- ``simpo`` and ``orpo``: the reference-free baselines of the ε-DPO paper's main table (#31), SimPO at its paper's
  Llama-3-8B-Instruct setting (β 2.5, γ/β 0.55: the comparison behind the ε-DPO paper's headline) and ORPO at λ 0.1.
  Their KL is still measured from the initial model (the evaluation loads it), and their response lengths are
  reported beside the others' (SimPO's length normalisation changes them).

Every run is ``epsdpo train experiments/trajectory_frontier.yaml KEY=VALUE…`` into ``runs/trajectory/NAME`` and one
``epsdpo eval`` per checkpoint (subprocesses, the commands recorded), then one summary
``docs/results/trajectory/NAME.json`` (commands, per-checkpoint evaluation, β and decision shares per step, the
machine, wall times). A run whose summary exists is skipped; training resumes from its last checkpoint; a finished
evaluation is kept. Commit the summaries: the report (``docs/results/trajectory_frontier.{md,png}``) is rebuilt from
them alone, so the grid can be completed in parts, on other machines.

``--jobs N`` runs N tasks (trainings, evaluations, summaries) at once, the runs first in the plan first, each
subprocess with ``OMP_NUM_THREADS`` = cores ÷ N unless set: for a GPU machine with many cores, or for a CPU whose
throughput rises with more processes than threads. Measured on a 2-core Intel Xeon (AMX): one evaluation took 166 s
alone at 2 threads, two side by side at 1 thread each took 233 s (1.43× the throughput, the numbers identical), and
a training beside an evaluation ran about 1.4× slower than alone; so ``--jobs 2`` there finishes about 1.3–1.4× more
runs per hour than one at a time. ``--seeds`` plans further seeds after the grid's three (the report counts them
apart and includes them in every mean and paired difference).
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _runs import (
    ROOT,
    Task,
    call,
    commit,
    epsdpo_command,
    fmt,
    grid_main,
    machine,
    mean_se,
    reference_text,
    short_machine,
    standard_eval,
    train_seconds,
)

from epsdpo.files import write_text_atomically
from epsdpo.stages.evaluate import SUMMARY_KEYS
from epsdpo.stats import t_interval95

CONFIG = Path("experiments/trajectory_frontier.yaml")  # relative to ROOT, as recorded in the commands
RUNS = Path("runs/trajectory")
RESULTS = ROOT / "docs" / "results"
SUMMARIES = RESULTS / "trajectory"
SEEDS = (0, 1, 2)
CHECKPOINTS = (8, 16, 24, 32, 40, 48, 56, 64)
#: the evaluation of every checkpoint (the sampler seed is the same for all runs, so all share the reference part).
#: forward_kl=false: KL(π_ref‖π) is not reported, and leaving it out saves one of the four log-prob passes of each
#: evaluation (dpo-s0 and eps-s0 were evaluated with it; every other figure is computed the same way).
EVAL = standard_eval("runs/trajectory/reference_cache")
METHODS: dict[str, list[str]] = {
    "dpo": ["loss_type=dpo"],
    "eps": ["loss_type=epsilon_dpo", "epsilon=0.01", "decision_records=true"],
    "eps_published": [
        "loss_type=epsilon_dpo",
        "epsilon=0.01",
        "decision_precision=published",
        "decision_records=true",
    ],
    "dpo_on_eps_beta": ["loss_type=dpo"],  # + beta_schedule=<the same seed's eps run>
    "eps_frozen": ["loss_type=epsilon_dpo", "epsilon=0.01", "freeze_global_beta=true", "decision_records=true"],
    "beta_dpo": ["loss_type=beta_dpo"],
    "tr_dpo": ["loss_type=dpo", "sync_ref_model=true", "precompute_ref_hidden_states=false"],
    # reference-free (#31): SimPO at the SimPO paper's Llama-3-8B-Instruct setting (β 2.5, γ/β 0.55), the one
    # behind the ε-DPO paper's headline comparison; ORPO at its paper's λ = 0.1 (the config's beta).
    "simpo": ["loss_type=simpo", "beta=2.5", "simpo_gamma=1.375", "precompute_ref_hidden_states=false"],
    "orpo": ["loss_type=orpo", "precompute_ref_hidden_states=false"],
    # ORPO at λ 0.1 stayed within KL 0.6 of the reference with no gain in 64 steps (its NLL term, ~30× the value of
    # the preference term, holds the policy to the reference's own chosen samples): the second point is λ 1.0, the
    # upper part of the grid the SimPO paper searched for ORPO (0.1–2.0)
    "orpo_l1": ["loss_type=orpo", "beta=1.0", "precompute_ref_hidden_states=false"],
}
LABELS = {
    "dpo": "DPO",
    "eps": "ε-DPO (float32 decisions)",
    "eps_published": "ε-DPO (published bf16 decisions)",
    "dpo_on_eps_beta": "DPO on ε-DPO's β trajectory",
    "eps_frozen": "ε-DPO, global β frozen",
    "beta_dpo": "β-DPO",
    "tr_dpo": "TR-DPO",
    "simpo": "SimPO (β 2.5, γ/β 0.55)",
    "orpo": "ORPO (λ 0.1)",
    "orpo_l1": "ORPO (λ 1.0)",
}
#: matched-KL comparisons: (method, against) at these KL values (nats), where both trajectories reach them
COMPARISONS = (
    ("eps", "dpo"),
    ("eps", "dpo_on_eps_beta"),
    ("eps_frozen", "dpo"),
    ("eps_published", "dpo"),
    ("beta_dpo", "dpo"),
    ("tr_dpo", "dpo"),
    ("eps", "simpo"),
    ("dpo", "simpo"),
    ("eps", "orpo"),
    ("dpo", "orpo"),
    ("eps", "orpo_l1"),
    ("dpo", "orpo_l1"),
)
MATCHED_KL = (2.0, 4.0, 8.0, 12.0)


@dataclass(frozen=True)
class Run:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"

    @classmethod
    def named(cls, name: str) -> Run:
        method, _, seed = name.rpartition("-s")
        return cls(method, int(seed))

    @property
    def overrides(self) -> list[str]:
        extra = [f"beta_schedule={schedule_file(self.needs)}"] if self.needs is not None else []
        return [*METHODS[self.method], *extra, f"seed={self.seed}"]

    @property
    def needs(self) -> str | None:
        """A run that must be summarised first (the source of a replayed β)."""
        return f"eps-s{self.seed}" if self.method == "dpo_on_eps_beta" else None


def schedule_file(source: str) -> Path:
    """Where the β replayed from ``source`` is written (relative to ROOT), from its committed summary."""
    return RUNS / f"{source}.beta.json"


def write_schedule(source: str) -> Path:
    """The per-step β of ``source`` as a ``beta_schedule`` file, taken from its committed summary.

    The summary keeps every step's ``kl/beta`` exactly as the run logged it (JSON floats round-trip), so the replay
    equals the one read from the run directory's metrics.jsonl, and needs neither that directory nor this machine.
    """
    summary = SUMMARIES / f"{source}.json"
    if not summary.is_file():
        raise RuntimeError(f"the β of {source} is replayed from {summary}, which does not exist; run {source} first")
    betas = json.loads(summary.read_text(encoding="utf-8"))["train"]["beta"]
    target = ROOT / schedule_file(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"source": str(summary.relative_to(ROOT)), "beta": betas}) + "\n", encoding="utf-8")
    return target


def plan(seeds: tuple[int, ...] = SEEDS) -> list[Run]:
    """Seed-major: every method of seed 0 first, so a partial grid already compares all methods."""
    return [Run(m, s) for s in seeds for m in METHODS]


def _times(out: Path) -> dict[str, Any]:
    """The wall times recorded so far for a run (``times.json`` in its directory: training, each evaluation)."""
    path = ROOT / out / "times.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"eval": {}}


_TIMES_LOCK = threading.Lock()  # with --jobs, evaluations of one run finish in several threads


def _record_time(out: Path, step: int | None, seconds: float) -> None:
    """Add the training's (``step`` None) or one evaluation's wall time to the run's ``times.json``."""
    with _TIMES_LOCK:
        times = _times(out)
        if step is None:
            times["train"] = round(seconds, 1)
        else:
            times["eval"][str(step)] = round(seconds, 1)
        write_text_atomically(ROOT / out / "times.json", json.dumps(times) + "\n")


def train_cmd(run: Run) -> list[str]:
    return ["epsdpo", "train", str(CONFIG), *run.overrides, f"output_dir={RUNS / run.name}"]


def eval_cmd(run: Run, step: int) -> list[str]:
    out = RUNS / run.name
    return ["epsdpo", "eval", str(out), f"checkpoint={step}", *EVAL, f"output={out / f'eval-checkpoint-{step}.json'}"]


def train(run: Run) -> None:
    """Train the run, or resume it from its last checkpoint (nothing to do once ``final/`` exists)."""
    out = RUNS / run.name
    (ROOT / out).mkdir(parents=True, exist_ok=True)
    if (ROOT / out / "final").is_dir():
        return
    if run.needs is not None:
        write_schedule(run.needs)
    resume = ["resume_from_checkpoint=auto"] if any((ROOT / out).glob("checkpoint-*")) else []
    started = time.perf_counter()
    call([epsdpo_command(), *train_cmd(run)[1:], *resume], ROOT / out / "experiment.log")
    _record_time(out, None, time.perf_counter() - started)


def evaluate(run: Run, step: int) -> None:
    """Evaluate one checkpoint (kept once written)."""
    out = RUNS / run.name
    if (ROOT / out / f"eval-checkpoint-{step}.json").is_file():
        return
    started = time.perf_counter()
    call([epsdpo_command(), *eval_cmd(run, step)[1:]], ROOT / out / "experiment.log")
    _record_time(out, step, time.perf_counter() - started)


def finish(run: Run, jobs: int = 1) -> dict[str, Any]:
    """Summarise an evaluated run into ``docs/results/trajectory/NAME.json`` (and drop its optimizer states)."""
    out = RUNS / run.name
    for ckpt in (ROOT / out).glob("checkpoint-*"):  # evaluated: keep only the weights (optimizer states are large)
        for extra in ("optimizer.pt", "scheduler.pt", "reference.safetensors", *[p.name for p in ckpt.glob("rng_*")]):
            (ckpt / extra).unlink(missing_ok=True)
    commands = {
        "train": " ".join(train_cmd(run)),
        "eval": {step: " ".join(eval_cmd(run, step)) for step in CHECKPOINTS},
    }
    summary = summarise(run, ROOT / out, commands)
    times = _times(out)
    train_s = times.get("train")
    if train_s is None:  # trained by an earlier invocation that kept no times.json: the loop's own figure
        train_s = train_seconds(ROOT / out, 0.0, trained_now=False)
    evals = [times["eval"].get(str(step)) for step in CHECKPOINTS]
    summary.update(
        commit=commit(),
        machine=machine(),
        seconds={
            "train": train_s,
            # the evaluations' own wall times, summed (None where one was made by an invocation that did not time it)
            "eval": None if None in evals else round(sum(evals), 1),
            "jobs": jobs,  # tasks run at once beside this run's (they share the machine: the times depend on it)
        },
    )
    SUMMARIES.mkdir(parents=True, exist_ok=True)
    (SUMMARIES / f"{run.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def tasks(run: Run, todo: list[str], jobs: int) -> list[Task]:
    """The run as tasks for ``--jobs`` (``todo``: the names of all runs to do, in order): its training (after the
    summary of the run it replays, if that is to be done too), each checkpoint's evaluation, its summary. Every
    evaluation but one also waits for that one (the first checkpoint of the first run that waits for no other), which
    writes the reference's cached part (when this machine has none yet) that the others then read instead of each
    sampling the reference."""
    first_run = next(name for name in todo if Run.named(name).needs not in todo)
    first = f"{first_run}:eval-{CHECKPOINTS[0]}"
    trained = Task(
        f"{run.name}:train",
        lambda: train(run),
        after=(f"{run.needs}:summary",) if run.needs in todo else (),
    )
    evals = [
        Task(
            f"{run.name}:eval-{step}",
            lambda step=step: evaluate(run, step),
            after=(trained.name,) + (() if f"{run.name}:eval-{step}" == first else (first,)),
        )
        for step in CHECKPOINTS
    ]
    return [trained, *evals, Task(f"{run.name}:summary", lambda: finish(run, jobs), after=tuple(e.name for e in evals))]


def run_one(run: Run) -> dict[str, Any]:
    """Train (or resume), evaluate every checkpoint and summarise one run; returns the summary written."""
    train(run)
    for step in CHECKPOINTS:
        evaluate(run, step)
    return finish(run)


#: what a summary keeps of each evaluation (the mean response length in tokens since #31: SimPO's length
#: normalisation changes it; summaries written before lack it)
EVAL_KEYS = (*SUMMARY_KEYS, "policy/response_tokens", "reference/response_tokens")


def summarise(run: Run, run_dir: Path, commands: dict[str, Any]) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    points = []
    for step in CHECKPOINTS:
        ev = json.loads((run_dir / f"eval-checkpoint-{step}.json").read_text(encoding="utf-8"))
        points.append({"step": step, **{k: ev[k] for k in EVAL_KEYS if k in ev}})
    per_step = {
        "beta": [r["kl/beta"] for r in train],
        "loss": [r["loss"] for r in train],
        "accuracy": [r["rewards/accuracies"] for r in train],
    }
    if "kl/steps_weaker" in train[0]:
        per_step["s=+1"] = [r["kl/steps_weaker"] for r in train]
        per_step["s=0"] = [r["kl/steps_kept"] for r in train]
        per_step["s=-1"] = [r["kl/steps_stronger"] for r in train]
    return {
        "name": run.name,
        "method": run.method,
        "seed": run.seed,
        "overrides": run.overrides,
        "commands": commands,
        "trajectory": points,
        "train": per_step,
    }


# ---- the report ---------------------------------------------------------------------------------------------------
def load_summaries() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SUMMARIES.glob("*.json"))]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Gain at KL ``x`` along a trajectory (piecewise linear in KL, points sorted by KL); None outside its range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def matched_differences(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each comparison and KL value: the paired (same seed) difference of the policies' gold rewards, mean ± s.e.
    over seeds and its 95% Student-t interval (``ci``; None below two seeds).

    The policies' gold rewards, not their gains: a gain subtracts the reference samples' reward, and those samples
    differ between machines (see :data:`CROSS_MACHINE`). Two runs made on one machine share them, so there the two
    differences are equal; across machines only the policy's reward keeps the comparison free of them. KL is
    estimated on the policy's own samples and needs no reference samples either.
    """
    by = {(s["method"], s["seed"]): s for s in summaries}
    rows = []
    for a, b in COMPARISONS:
        for kl in MATCHED_KL:
            diffs = []
            for seed in sorted({s["seed"] for s in summaries}):
                if (a, seed) not in by or (b, seed) not in by:
                    continue
                ga = interpolate([(p["kl"], p["policy/gold_reward"]) for p in by[a, seed]["trajectory"]], kl)
                gb = interpolate([(p["kl"], p["policy/gold_reward"]) for p in by[b, seed]["trajectory"]], kl)
                if ga is not None and gb is not None:
                    diffs.append(ga - gb)
            mean, se = mean_se(diffs)
            ci = t_interval95(diffs) if len(diffs) > 1 else None
            rows.append({"a": a, "b": b, "kl": kl, "n": len(diffs), "diff": mean, "se": se, "ci": ci, "diffs": diffs})
    return rows


def curves(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per method and checkpoint: mean KL, policy gold reward and gain over seeds, each with its standard error over
    seeds."""
    out: dict[str, list[dict[str, float]]] = {}
    for method in METHODS:
        runs = [s for s in summaries if s["method"] == method]
        if not runs:
            continue
        rows = []
        for i, step in enumerate(CHECKPOINTS):
            kl, kl_se = mean_se([r["trajectory"][i]["kl"] for r in runs])
            gain, gain_se = mean_se([r["trajectory"][i]["gold_reward_gain"] for r in runs])
            reward, reward_se = mean_se([r["trajectory"][i]["policy/gold_reward"] for r in runs])
            rows.append(
                {
                    "step": step,
                    "kl": kl,
                    "kl_se": kl_se,
                    "reward": reward,
                    "reward_se": reward_se,
                    "gain": gain,
                    "gain_se": gain_se,
                    "n": len(runs),
                }
            )
        out[method] = rows
    return out


#: What differing reference samples mean here: every gain is over the reference samples of the run's own machine.
CROSS_MACHINE = (
    "So the trajectories table, the figure and the matched-KL differences use the policies' own gold rewards, which "
    "involve no reference samples (for two runs on one machine their differences equal the differences of the "
    "gains) and carry only the sampling noise of the policies' own samples; a run's gain over its reference (in its "
    "summary) also carries its machine's reference draw (below)."
)


def _reference_range(summaries: list[dict[str, Any]]) -> str:
    values = sorted({round(_reference_reward(s), 3) for s in summaries})
    return f"{values[0]:.3f}" if len(values) == 1 else f"{values[0]:.3f}–{values[-1]:.3f} depending on the machine"


def _short_of_matched_kl(summaries: list[dict[str, Any]]) -> list[str]:
    """A line for each method none of whose runs reaches the first matched KL (its comparisons are all —): how far its
    runs went, and their gold reward there, so that "—" reads as a result rather than a gap."""
    out = []
    for method in METHODS:
        runs = [s for s in summaries if s["method"] == method]
        if not runs or any(max(p["kl"] for p in r["trajectory"]) >= MATCHED_KL[0] for r in runs):
            continue
        top = max(p["kl"] for r in runs for p in r["trajectory"])
        rewards = [p["policy/gold_reward"] for r in runs for p in r["trajectory"]]
        out.append(
            f"- {LABELS[method]}: no run reaches KL {MATCHED_KL[0]:g} in {CHECKPOINTS[-1]} steps "
            f"({len(runs)} run{'s' * (len(runs) > 1)}; "
            f"KL at most {top:.2f} at any checkpoint, the policy's gold reward {min(rewards):.3f}–{max(rewards):.3f} "
            f"against the reference's {_reference_range(runs)}), so it has no matched-KL comparison."
        )
    return ["", *out] if out else []


def _excluding_zero(rows: list[dict[str, Any]]) -> str:
    """Which comparisons' intervals exclude 0, out of how many cells have one."""
    with_ci = [r for r in rows if r["ci"] is not None]
    hits = [r for r in with_ci if r["ci"][0] > 0 or r["ci"][1] < 0]
    named = ", ".join(f"{LABELS[r['a']]} − {LABELS[r['b']]} at KL {r['kl']:g} ({r['diff']:+.3f})" for r in hits)
    return f"{len(hits)} of {len(with_ci)}" + (f": {named}" if hits else "")


def lengths_section(summaries: list[dict[str, Any]]) -> list[str]:
    """The policies' mean response length (tokens, of at most 48 new) per method and checkpoint, mean ± s.e. over the
    seeds whose summaries record it (written since #31), beside the reference's."""
    key = "policy/response_tokens"
    lines = [
        "",
        "## Response lengths (tokens per sample, at most 48; mean over seeds ± s.e. over seeds)",
        "",
        "Recorded in the summaries written since the reference-free baselines were added; methods summarised "
        "before then show —.",
        "",
        "| method | n | " + " | ".join(f"step {s}" for s in CHECKPOINTS[::2]) + " |",
        "|---|---|" + "---|" * len(CHECKPOINTS[::2]),
    ]
    refs = [p["reference/response_tokens"] for s in summaries for p in s["trajectory"] if key in p]
    for method in METHODS:
        runs = [s for s in summaries if s["method"] == method and key in s["trajectory"][0]]
        if not runs:
            if any(s["method"] == method for s in summaries):
                lines.append(f"| {LABELS[method]} | 0 | " + " | ".join("—" for _ in CHECKPOINTS[::2]) + " |")
            continue
        cells = [fmt(*mean_se([r["trajectory"][i][key] for r in runs]), 1) for i in range(0, len(CHECKPOINTS), 2)]
        lines.append(f"| {LABELS[method]} | {len(runs)} | " + " | ".join(cells) + " |")
    if refs:
        lines.append(f"| reference (every run's) | — | {statistics.fmean(refs):.1f} | | | |")
    return lines


def _reference_reward(summary: dict[str, Any]) -> float:
    """The reference's gold reward in a run's evaluations (the same samples at every checkpoint)."""
    return summary["trajectory"][0]["reference/gold_reward"]


def report(summaries: list[dict[str, Any]]) -> tuple[Path, Path]:
    md, png = RESULTS / "trajectory_frontier.md", RESULTS / "trajectory_frontier.png"
    plot(summaries, png)
    done = {s["name"] for s in summaries}
    grid = {r.name for r in plan()}
    further = sorted(done - grid)
    lines = [
        "# What ε-DPO adds over DPO: reward-vs-KL trajectories (issue #15)",
        "",
        f"Generated by `experiments/trajectory_frontier.py --report` from the {len(summaries)} run summaries in "
        "`docs/results/trajectory/` (do not edit by hand). Runs done: "
        f"{len(done & grid)} of {len(grid)} (seeds {', '.join(map(str, SEEDS))}); "
        f"missing: {', '.join(r.name for r in plan() if r.name not in done) or 'none'}"
        + (f"; further seeds: {', '.join(further)}." if further else "."),
        "",
        "Setup: SmolLM2-135M-Instruct, LoRA r 16 on every linear layer but the head, float32, the 520 bundled "
        "on-policy sentiment pairs, 64 steps of 8 pairs at lr 5e-4 (cosine, warm-up 0.1), β₀ = 0.1, ε = 0.01, "
        "checkpoints "
        "every 8 steps. Each checkpoint is evaluated on all 110 held-out prompts × 2 independent samples per model "
        "(max 48 new tokens, sampler seed 0; every run on one machine shares the reference samples, see "
        "Provenance): the policy's gold reward (VADER sentiment of its samples, mean over prompts; the reference's "
        "is "
        f"{_reference_range(summaries)}), KL(π‖π_ref) estimated on the policy's samples. "
        "Between runs, ± is the standard error over seeds (n in the tables) and intervals are 95% Student-t "
        "intervals over seeds (with 3 seeds, ± 4.3 standard errors).",
        "",
        "![trajectories](trajectory_frontier.png)",
        "",
        "## Trajectories (mean over seeds ± s.e. over seeds)",
        "",
        "| method | n | " + " | ".join(f"step {s}: KL / gold reward" for s in CHECKPOINTS[::2]) + " |",
        "|---|---|" + "---|" * len(CHECKPOINTS[::2]),
    ]
    for method, rows in curves(summaries).items():
        cells = [f"{fmt(r['kl'], r['kl_se'], 1)} / {fmt(r['reward'], r['reward_se'])}" for r in rows[::2]]
        lines.append(f"| {LABELS[method]} | {rows[0]['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Reward differences at matched KL (paired by seed, interpolated along each trajectory)",
        "",
        "The difference of the two policies' gold rewards at the same KL(π‖π_ref), mean ± s.e. over seeds, its 95% "
        "t interval over seeds, then n (the seeds whose two trajectories both reach that KL) and each seed's "
        "difference. On one machine it equals the difference of the gains; it does not depend on the reference's "
        "samples (see Provenance). Cells whose interval excludes 0: "
        f"{_excluding_zero(matched_differences(summaries))}.",
        "",
        "| comparison | " + " | ".join(f"KL {kl:g}" for kl in MATCHED_KL) + " |",
        "|---|" + "---|" * len(MATCHED_KL),
    ]
    rows = matched_differences(summaries)
    for a, b in COMPARISONS:
        cells = []
        for r in (r for r in rows if r["a"] == a and r["b"] == b):
            per_seed = ", ".join(f"{d:+.3f}" for d in r["diffs"])
            ci = "" if r["ci"] is None else f", [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
            cells.append("—" if not r["n"] else f"{fmt(r['diff'], r['se'])}{ci} (n {r['n']}: {per_seed})")
        lines.append(f"| {LABELS[a]} − {LABELS[b]} | " + " | ".join(cells) + " |")
    lines += _short_of_matched_kl(summaries)
    lines += lengths_section(summaries)
    lines += ["", "## Decision shares over training (s = +1 / 0 / −1, mean over seeds)", ""]
    lines += ["| method | steps 1–8 | steps 25–32 | steps 57–64 | β after 64 steps |", "|---|---|---|---|---|"]
    for method in ("eps", "eps_published", "eps_frozen"):
        runs = [s for s in summaries if s["method"] == method and "s=+1" in s["train"]]
        if not runs:
            continue
        cells = []
        for lo, hi in ((0, 8), (24, 32), (56, 64)):
            if any(len(r["train"]["s=0"]) < hi for r in runs):  # a shorter run (a test's)
                cells.append("—")
                continue
            shares = [
                statistics.fmean(statistics.fmean(r["train"][k][lo:hi]) for r in runs) for k in ("s=+1", "s=0", "s=-1")
            ]
            cells.append(" / ".join(f"{x:.2f}" for x in shares))
        beta = statistics.fmean(r["trajectory"][-1]["beta"] for r in runs)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {beta:.4f} |")
    lines += ["", "## Provenance", "", *reference_text(summaries, _reference_reward, CROSS_MACHINE), ""]
    lines += [
        f"- {s['name']}: {short_machine(s) or 'machine not recorded'}, commit {s.get('commit')}, "
        f"train {s['seconds']['train']} s, eval {s['seconds']['eval']} s"
        for s in summaries
    ]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, png


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    """Left: each method's trajectory (policy gold reward against KL, mean ± s.e. over seeds) over the band of the
    machines' reference gold rewards. Right: the matched-KL differences with their 95% t intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True, width_ratios=(3, 2))
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for method, rows in curves(summaries).items():
        ax.errorbar(
            [r["kl"] for r in rows],
            [r["reward"] for r in rows],
            xerr=[0 if math.isnan(r["kl_se"]) else r["kl_se"] for r in rows],
            yerr=[0 if math.isnan(r["reward_se"]) else r["reward_se"] for r in rows],
            marker="o",
            markersize=3,
            capsize=2,
            color=colours[method],
            label=f"{LABELS[method]} (n {rows[0]['n']})",
        )
    references = [_reference_reward(s) for s in summaries]
    if references:
        ax.axhspan(min(references) - 1e-3, max(references) + 1e-3, color="0.85", label="reference (per machine)")
    ax.set(
        xlabel="KL(π‖π_ref), nats (policy samples)",
        ylabel="policy gold reward (VADER)",
        title="trajectories: checkpoints every 8 of 64 steps (mean ± s.e. over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    rows = matched_differences(summaries)
    width = 0.8 / len(COMPARISONS)
    for i, (a, b) in enumerate(COMPARISONS):
        cells = [r for r in rows if r["a"] == a and r["b"] == b and r["ci"] is not None]
        if not cells:
            continue
        x = [MATCHED_KL.index(r["kl"]) + (i - (len(COMPARISONS) - 1) / 2) * width for r in cells]
        dx.errorbar(
            x,
            [r["diff"] for r in cells],
            yerr=[[r["diff"] - r["ci"][0] for r in cells], [r["ci"][1] - r["diff"] for r in cells]],
            fmt="o",
            markersize=4,
            capsize=2,
            color=colours[a] if b == "dpo" else "0.3",
            label=f"{LABELS[a]} − {LABELS[b]}",
        )
    dx.axhline(0, color="0.4", linewidth=0.8)
    dx.set_xticks(range(len(MATCHED_KL)), [f"KL {kl:g}" for kl in MATCHED_KL])
    dx.set(ylabel="gold-reward difference (paired by seed)", title="at matched KL: mean and 95% t interval over seeds")
    dx.grid(alpha=0.3, axis="y")
    if dx.get_legend_handles_labels()[0]:  # no comparison has two seeds yet: nothing to draw
        dx.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    grid_main(__doc__, "trajectory", plan, load_summaries, run_one, report, tasks=tasks, seeds=SEEDS)


if __name__ == "__main__":
    main()
