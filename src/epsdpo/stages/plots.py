"""PNG plots of runs: training curves, the β trajectory, and the reward-vs-KL frontier (matplotlib, Agg backend).

- :func:`plot_training` reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/plots/training_curves.png`` (loss,
  implicit reward margin and preference accuracy per step; held-out values, the records with ``eval/`` keys, as
  points) and ``RUN_DIR/plots/beta.png`` (β after each step, ``kl/beta_next``, from β₀ at step 0, so its last
  point is the β after training; ``kl/beta`` per step for methods without one), above the shares of pairs whose
  decision was a weaker or a stronger penalty, ``kl/steps_weaker`` / ``kl/steps_stronger``; a run without them
  has a constant β).
- with ``decisions.jsonl`` (``decision_records=true``), also ``RUN_DIR/plots/decisions.png``: the shares of
  s = +1 / 0 / −1 against the pair's DPO margin (margin deciles over the whole run) and over training.
- :func:`plot_training_comparison` compares several runs' training curves (loss, accuracy, margin, β) on shared
  axes, one colour per run: ``training_curves_compared.png``.
- :func:`plot_reward_vs_kl` reads ``eval.json`` of several runs (``epsdpo eval``) and writes ``reward_vs_kl.png``:
  mean gold reward of sampled responses against the estimated KL(π‖π_ref), both ± one standard error (over prompts,
  :mod:`epsdpo.stats`), one labelled marker per run and each distinct reference model at KL 0 with its own standard
  error (runs against different references get one each), as in the DPO paper's Figure 2 and ε-DPO's Pareto plot.
  Each marker's label names the evaluation it shows.
- :func:`plot_trajectory` reads the in-training generation evaluations of one or several runs (``gen/`` records of
  ``metrics.jsonl``, ``eval_generation``) and writes ``trajectory.png``: each run's path through the reward-vs-KL
  plane, gold reward against KL(π‖π_ref), both ± one standard error, each point labelled with its step.
- :func:`plot_iterate` reads the ``summary.json`` of ``epsdpo iterate`` runs and writes ``iterate.png``: gold-reward
  gain, KL and win rate against the original model per round.

Missing optional metrics leave a panel with a note instead of failing; a run without ``metrics.jsonl`` is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from epsdpo.files import read_jsonl
from epsdpo.rundir import read_eval, read_generation_evaluations, read_iterate_summary, read_metrics_file
from epsdpo.stats import smoothing_window, trailing_mean

__all__ = [
    "plot_iterate",
    "plot_reward_vs_kl",
    "plot_training",
    "plot_training_comparison",
    "plot_trajectory",
    "read_eval",
    "read_generation_evaluations",
    "read_metrics_file",
    "smoothing_window",
    "trailing_mean",
]

PLOTS_DIR = "plots"


def _png_target(out: str | Path, default_name: str) -> Path:
    """``out`` itself when it names a ``.png`` file, else ``out / default_name``; its folder is created."""
    target = Path(out)
    if target.suffix.lower() != ".png":
        target = target / default_name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _held_out_series(
    held_out: Sequence[dict[str, Any]], key: str
) -> tuple[list[float], list[float], list[float] | None]:
    """The held-out records' steps and values of ``eval/{key}``, with their standard errors where every point has one
    (else None: no error bars)."""
    points = [r for r in held_out if isinstance(r.get(f"eval/{key}"), int | float) and "step" in r]
    errors = [r.get(f"eval/{key}_se") for r in points]
    steps, values = [r["step"] for r in points], [r[f"eval/{key}"] for r in points]
    return steps, values, errors if all(isinstance(e, int | float) for e in errors) else None


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _integer_steps(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_training(run_dir: str | Path) -> list[Path]:
    """Write ``plots/training_curves.png`` and ``plots/beta.png`` into the run directory; returns their paths."""
    plt = _pyplot()
    run = Path(run_dir)
    records, held_out = read_metrics_file(run)
    out = run / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    name = run.resolve().name

    panels = (("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "preference accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    window = smoothing_window(len(records))
    for ax, (key, label) in zip(axes, panels, strict=True):
        steps, values = _series(records, key)
        if steps:  # one step's few pairs are noisy: the raw values faint, their trailing mean solid
            if window > 1:
                ax.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.3, label="train, each logging step")
            ax.plot(
                steps,
                trailing_mean(values, window),
                color="tab:blue",
                linewidth=1.6,
                label=f"train, mean of the last {window} logged steps" if window > 1 else "train",
            )
        eval_steps, eval_values, errors = _held_out_series(held_out, key)
        if eval_steps:
            ax.errorbar(
                eval_steps,
                eval_values,
                yerr=errors,
                fmt="o-",
                color="tab:orange",
                markersize=5,
                capsize=3,
                label="held-out pairs",
            )
        if not steps and not eval_steps:
            _empty(ax, f"no {label} recorded")
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=label, xlabel="optimizer step", ylabel=label)
        ax.grid(alpha=0.3)
        _integer_steps(ax)
        if steps or eval_steps:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{name}: training curves (per-pair means over each logging interval; held-out: every eval_steps)")
    curves = out / "training_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    written = [curves, _plot_beta(plt, records, out / "beta.png", name)]
    if (run / "decisions.jsonl").is_file():
        written.append(plot_decisions(run / "decisions.jsonl", out / "decisions.png", name))
    return written


#: the training curves :func:`plot_training_comparison` compares across runs, each with its panel's title; β is
#: drawn as logged (it is not noisy), the others smoothed as in each run's own plot
COMPARED_CURVES = (
    ("loss", "loss"),
    ("rewards/accuracies", "preference accuracy"),
    ("rewards/margins", "reward margin"),
    ("kl/beta", "β (KL penalty)"),
)

#: the file :func:`plot_training_comparison` writes
COMPARISON_PNG = "training_curves_compared.png"


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """A short, distinct name per run: its directory's name, or its last two path parts where names repeat
    (``a/seed0`` and ``b/seed0``)."""
    paths = [Path(r).resolve() for r in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def plot_training_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """``training_curves_compared.png`` (in the directory ``out``, or the ``.png`` path ``out``): several runs'
    training curves on shared axes, one colour per run, named in the legend. One panel per curve of
    :data:`COMPARED_CURVES` that every run logged (a curve some run lacks is left out, with a note in the title):
    each run's trailing mean over its own :func:`~epsdpo.stats.smoothing_window` solid, its raw per-step values
    faint, its held-out points (± s.e. where recorded) as markers in its colour; β as logged."""
    if len(run_dirs) < 2:
        raise ValueError("compare at least two run directories")
    plt = _pyplot()
    labels = run_labels(run_dirs)
    runs = [read_metrics_file(r) for r in run_dirs]
    has = [{k for record in records for k in record} for records, _ in runs]
    panels = [(key, title) for key, title in COMPARED_CURVES if all(key in keys for keys in has)]
    shown = {key for key, _ in panels}
    missing = [key for key, _ in COMPARED_CURVES if key not in shown and any(key in keys for keys in has)]
    if not panels:
        raise ValueError(
            f"the runs {', '.join(labels)} have no training curve in common "
            f"({', '.join(k for k, _ in COMPARED_CURVES)})"
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.9), constrained_layout=True, squeeze=False)
    for i, (label, (records, held_out)) in enumerate(zip(labels, runs, strict=True)):
        colour = f"C{i % 10}"
        window = smoothing_window(len(records))
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            steps, values = _series(records, key)
            if key == "kl/beta" or window == 1:
                ax.plot(steps, values, color=colour, linewidth=1.5, label=label)
            else:
                ax.plot(steps, values, color=colour, linewidth=0.7, alpha=0.25)
                ax.plot(
                    steps,
                    trailing_mean(values, window),
                    color=colour,
                    linewidth=1.6,
                    label=f"{label} (mean of {window} steps)",
                )
            eval_steps, eval_values, errors = _held_out_series(held_out, key)
            if eval_steps:
                ax.errorbar(
                    eval_steps,
                    eval_values,
                    yerr=errors,
                    fmt="o",
                    color=colour,
                    markersize=5,
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    capsize=3,
                )
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.set(title=title, xlabel="optimizer step", ylabel=title)
        ax.grid(alpha=0.3)
        _integer_steps(ax)
    axes[0][0].legend(loc="best", fontsize=8)
    note = f"; not logged by every run: {', '.join(missing)}" if missing else ""
    fig.suptitle(
        "training curves compared (solid: trailing mean; faint: each logging step; dots: held-out pairs ± s.e.)" + note,
        fontsize=10,
    )
    target = _png_target(out, COMPARISON_PNG)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def read_decisions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``decisions.jsonl`` (one per training pair and step)."""
    return read_jsonl(path)


def decision_shares_by_margin(records: Sequence[dict[str, Any]], bins: int = 10) -> list[dict[str, float]]:
    """Per margin quantile bin (over every record): the bin's mean margin, its record count and the shares of
    s = +1, 0, −1."""
    ordered = sorted(records, key=lambda r: r["margin"])
    out = []
    for k in range(bins):
        part = ordered[k * len(ordered) // bins : (k + 1) * len(ordered) // bins]
        if not part:
            continue
        n = len(part)
        out.append(
            {
                "margin": sum(r["margin"] for r in part) / n,
                "n": float(n),
                **{f"s={s:+d}": sum(r["s"] == s for r in part) / n for s in (1, 0, -1)},
            }
        )
    return out


def plot_decisions(path: Path, out: Path, name: str) -> Path:
    """``decisions.png``: decision shares against the DPO margin, and per step."""
    plt = _pyplot()
    records = read_decisions(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    colours = {
        1: ("tab:green", "weaker penalty (s = +1)"),
        0: ("0.5", "kept (s = 0)"),
        -1: ("tab:red", "stronger (s = −1)"),
    }
    by_margin = decision_shares_by_margin(records)
    steps = sorted({r["step"] for r in records})
    for s, (colour, label) in colours.items():
        left.plot(
            [b["margin"] for b in by_margin], [b[f"s={s:+d}"] for b in by_margin], "o-", color=colour, label=label
        )
        per_step = [[r for r in records if r["step"] == k] for k in steps]
        right.plot(steps, [sum(r["s"] == s for r in p) / len(p) for p in per_step], color=colour, label=label)
    left.set(title="by DPO margin z − γ (deciles over the run)", xlabel="margin (nats)", ylabel="share of pairs")
    right.set(title="over training", xlabel="optimizer step", ylabel="share of pairs")
    for ax in (left, right):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    _integer_steps(right)
    fig.suptitle(f"{name}: ε-DPO decisions ({len(records)} pair-steps)")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_beta(plt: Any, records: Sequence[dict[str, Any]], path: Path, name: str) -> Path:
    steps, betas = _series(records, "kl/beta")
    next_steps, next_betas = _series(records, "kl/beta_next")
    if next_steps and steps:  # ε-DPO: β₀ at step 0, then the β after each step; the last point is the β after
        steps, betas = [0, *next_steps], [betas[0], *next_betas]  # training, the one printed and evaluated with
    w_steps, weaker = _series(records, "kl/steps_weaker")
    s_steps, stronger = _series(records, "kl/steps_stronger")
    adaptive = bool(w_steps or s_steps)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7.5, 5.5), sharex=True, constrained_layout=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    if steps:
        top.plot(steps, betas, color="tab:purple", linewidth=1.5)
        top.annotate(f"{betas[-1]:.4g}", (steps[-1], betas[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        _empty(top, "no β (kl/beta) recorded")
    top.set(ylabel="β (KL penalty)")
    top.grid(alpha=0.3)
    if adaptive:
        bottom.plot(w_steps, weaker, color="tab:green", label="weaker penalty (s = +1)")
        bottom.plot(s_steps, stronger, color="tab:red", label="stronger penalty (s = −1)")
        bottom.set_ylim(-0.02, 1.02)
        bottom.legend(loc="best", fontsize=8)
    else:
        _empty(bottom, "no per-pair decisions: not an ε-DPO run")
    bottom.set(xlabel="optimizer step", ylabel="share of pairs")
    bottom.grid(alpha=0.3)
    _integer_steps(bottom)
    if adaptive:
        title = f"{name}: β trajectory (ε-DPO)"
    elif betas and len(set(betas)) <= 1:
        title = f"{name}: β constant ({betas[0]:.4g})"
    else:
        title = f"{name}: β"
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def reference_groups(results: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The distinct references among labelled evaluations, in order of first appearance: each with its name, its
    gold reward and standard error, and the labels of the runs measured against it.

    Two evaluations share a reference when they name the same reference model and report the same gold reward for it
    (the same model, prompts, sampling settings and seed); anything else is another reference, drawn on its own: a
    mean of two references' rewards would be a point that is no model."""
    groups: list[dict[str, Any]] = []
    for label, result in results:
        reward = _number(result.get("reference/gold_reward"))
        if reward is None:
            continue
        name = str(result.get("reference") or "reference")
        for group in groups:
            if group["name"] == name and abs(group["reward"] - reward) <= 1e-9:
                group["runs"].append(label)
                break
        else:
            se = _number(result.get("reference/gold_reward_se"))
            groups.append({"name": name, "reward": reward, "se": se, "runs": [label]})
    return groups


def plot_reward_vs_kl(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the reward-vs-KL plot of the runs' ``eval.json`` files to ``out`` (a directory or a ``.png`` path).

    Each distinct reference (:func:`reference_groups`) is a star at KL 0 with its standard error; runs evaluated
    against different references (other base models, prompts or seeds) get one star each, named with its runs.
    """
    plt = _pyplot()
    if not run_dirs:
        raise ValueError("give at least one run directory with an eval.json")
    target = _png_target(out, "reward_vs_kl.png")
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    evaluated: list[tuple[str, Mapping[str, Any]]] = []
    names: set[str] = set()
    for i, run in enumerate(run_dirs):
        result = read_eval(run)
        label = Path(run).resolve().name if Path(run).is_dir() else Path(run).resolve().parent.name
        evaluation = str(result.get("name") or "unnamed")
        names.add(evaluation)
        if len(run_dirs) > 1:
            label = f"{label} [{evaluation if len(evaluation) <= 24 else evaluation[:21] + '...'}]"
        kl, reward = _number(result.get("kl")), _number(result.get("policy/gold_reward"))
        if kl is None or reward is None:
            raise ValueError(f"{run}: eval.json lacks 'kl' or 'policy/gold_reward'; rerun `epsdpo eval`")
        # standard errors; an eval.json written before they existed has none (bars left out, said in the legend)
        y_se, x_se = _number(result.get("policy/gold_reward_se")), _number(result.get("kl_se"))
        if y_se is None:
            label += " (no s.e. recorded)"
        ax.errorbar(kl, reward, yerr=y_se, xerr=x_se, fmt="o", markersize=7, capsize=4, color=f"C{i % 10}", label=label)
        ax.annotate(label, (kl, reward), textcoords="offset points", xytext=(6, 6), fontsize=8)
        evaluated.append((label.split(" [")[0], result))
    groups = reference_groups(evaluated)
    shades = ("black", "0.45", "0.65", "0.3", "0.55")
    for j, group in enumerate(groups):
        colour = shades[j % len(shades)]
        label = "reference"
        if len(groups) > 1:  # say which runs each one is the reference of
            runs = ", ".join(group["runs"])
            label = f"reference {group['name']} (of {runs if len(runs) <= 40 else runs[:37] + '...'})"
        ax.errorbar(
            0.0,
            group["reward"],
            yerr=group["se"],
            marker="*",
            markersize=14,
            color=colour,
            linestyle="none",
            capsize=4,
            label=label,
        )
        ax.axhline(group["reward"], color=colour, linestyle=":", linewidth=1, alpha=0.6)
    ax.axvline(0.0, color="0.8", linewidth=1)
    ax.set(
        xlabel="KL(π ‖ π_ref) estimated from the policy's samples (nats)",
        ylabel="gold reward of sampled responses (mean ± s.e.)",
        title="Reward vs KL on held-out prompts",
    )
    if len(names) == 1:  # one evaluation shown: say which (several: each label says its own)
        (only,) = names
        ax.set_title(f"Reward vs KL on held-out prompts\nevaluation: {only}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plot_trajectory(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``trajectory.png``, the runs' reward-vs-KL trajectories during training, to ``out`` (a directory or a
    ``.png`` path): per run, its in-training generation evaluations (``gen/gold_reward`` against ``gen/kl``, both ±
    one standard error) joined in step order, each point labelled with its step. A run's step-0 point is its
    reference's own draw against itself (KL ≈ 0); runs evaluated on other prompts or settings are not comparable
    point for point, which the legend's prompt counts help to see. ``ValueError`` for a run without such records."""
    plt = _pyplot()
    if not run_dirs:
        raise ValueError("give at least one run directory with in-training generation evaluations")
    target = _png_target(out, "trajectory.png")
    fig, ax = plt.subplots(figsize=(7.5, 5.5), constrained_layout=True)
    for i, run in enumerate(run_dirs):
        records = [
            r
            for r in read_generation_evaluations(run)
            if _number(r.get("gen/kl")) is not None and _number(r.get("gen/gold_reward")) is not None
        ]
        if not records:
            raise ValueError(
                f"{run}: metrics.jsonl holds no in-training generation evaluation (gen/ records); train with "
                "eval_generation=true eval_steps=N"
            )
        colour = f"C{i % 10}"
        kls = [float(r["gen/kl"]) for r in records]
        rewards = [float(r["gen/gold_reward"]) for r in records]
        x_se = [_number(r.get("gen/kl_se")) or 0.0 for r in records]
        y_se = [_number(r.get("gen/gold_reward_se")) or 0.0 for r in records]
        prompts = records[-1].get("gen/num_prompts")
        label = Path(run).resolve().name + (f" ({int(prompts)} prompts)" if isinstance(prompts, int | float) else "")
        ax.errorbar(
            kls, rewards, xerr=x_se, yerr=y_se, fmt="o-", color=colour, markersize=5, capsize=3, linewidth=1.2,
            alpha=0.9, label=label,
        )  # fmt: skip
        for record, kl, reward in zip(records, kls, rewards, strict=True):
            ax.annotate(
                str(record.get("step")), (kl, reward), textcoords="offset points", xytext=(5, 4), fontsize=7,
                color=colour,
            )  # fmt: skip
    ax.axvline(0.0, color="0.8", linewidth=1)
    ax.set(
        xlabel="KL(π ‖ π_ref) estimated from the policy's samples (nats)",
        ylabel="gold reward of sampled responses (mean ± s.e.)",
        title="Reward vs KL during training (labels: optimizer step)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plot_iterate(iterate_dirs: str | Path | Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``iterate.png``: per round of one or several ``epsdpo iterate`` runs, the gold-reward gain over the original
    model (paired by prompt), KL(π_r‖original) and the win rate against the original's samples, each ± one standard
    error; round 0 is the original model (gain 0, KL 0, win rate ½). Written to ``out`` (default: the first run's
    ``plots/``)."""
    dirs = [Path(iterate_dirs)] if isinstance(iterate_dirs, str | Path) else [Path(d) for d in iterate_dirs]
    if not dirs:
        raise ValueError("plot_iterate needs at least one iterate directory")
    plt = _pyplot()
    panels = (
        ("gold_reward_gain", "gold-reward gain over the original", 0.0),
        ("kl", "KL(π‖original)", 0.0),
        ("win_rate", "win rate against the original", 0.5),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for number, directory in enumerate(dirs):
        rounds = [r for r in read_iterate_summary(directory)["rounds"] if "evaluate" in r]
        color = f"C{number % 10}"
        for ax, (key, label, start) in zip(axes, panels, strict=True):
            xs = [0] + [r["round"] for r in rounds]
            ys = [start] + [r["evaluate"].get(key, math.nan) for r in rounds]
            errors = [0.0] + [r["evaluate"].get(f"{key}_se") or 0.0 for r in rounds]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=color, label=directory.resolve().name)
            ax.set(title=label, xlabel="round", ylabel=label)
    for ax in axes:
        ax.grid(alpha=0.3)
        _integer_steps(ax)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("epsdpo iterate: each round's policy against the original model (± one standard error)")
    target = Path(out) if out is not None else dirs[0] / PLOTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    path = target / "iterate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
