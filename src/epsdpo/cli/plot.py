"""``epsdpo plot RUN_DIR [RUN_DIR …] [--out DIR]``: training curves, β trajectory and reward-vs-KL PNGs.

Per run with ``metrics.jsonl``: ``RUN_DIR/plots/training_curves.png`` and ``RUN_DIR/plots/beta.png``; with several
such runs also ``training_curves_compared.png``: their smoothed loss, accuracy, margin and β (the curves every run
logged) on shared axes, one colour per run. For the runs with an ``eval.json`` (from ``epsdpo eval``):
``reward_vs_kl.png``. For the runs trained with ``eval_generation``: ``trajectory.png``, their reward-vs-KL
trajectories during training (gold reward against KL at each in-training evaluation, both ± s.e., labelled by step).
All go to ``--out``, by default ``RUN_DIR/plots/`` for a single run and the first run's parent directory (e.g.
``runs/``) for several. Directories of ``epsdpo iterate``
(with ``iterate.yaml``) give ``iterate.png`` instead: gain, KL and win rate against the original model per round,
all of them in one figure. Exit status: 0 done, 1 a missing or unreadable file.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories of `epsdpo train` (or of `epsdpo iterate`)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where reward_vs_kl.png, trajectory.png and training_curves_compared.png go (default: RUN_DIR/plots for "
        "one run, else the first run's parent directory)",
    )


def run(args: argparse.Namespace) -> int:
    # deferred: argument parsing and `epsdpo --help` never import torch or transformers
    from epsdpo.rundir import read_generation_evaluations
    from epsdpo.stages.plots import PLOTS_DIR, plot_reward_vs_kl, plot_training, plot_trajectory

    runs = [Path(r) for r in args.runs]
    written: list[Path] = []
    iterated = [r for r in runs if (r / "iterate.yaml").is_file()]
    if iterated:
        from epsdpo.stages.plots import plot_iterate

        if len(iterated) != len(runs):
            print("epsdpo plot: error: give either `epsdpo iterate` directories or training runs, not both")
            return 1
        print(f"written: {plot_iterate(iterated, args.out)}")
        return 0
    out = args.out or (runs[0] / PLOTS_DIR if len(runs) == 1 else runs[0].resolve().parent)
    try:
        for run_dir in runs:
            if not run_dir.is_dir():
                raise FileNotFoundError(f"{run_dir} is not a directory; give run directories of `epsdpo train`")
            if (run_dir / "metrics.jsonl").is_file():
                written.extend(plot_training(run_dir))
            else:
                print(f"note: {run_dir} has no metrics.jsonl; no training curves for it")
        written.extend(_compare_training(runs, out))
        trained = [r for r in runs if (r / "metrics.jsonl").is_file()]
        live = [r for r in trained if read_generation_evaluations(r)]
        if live:
            written.append(plot_trajectory(live, out))
        evaluated = [r for r in runs if (r / "eval.json").is_file()]
        for run_dir in runs:
            if run_dir not in evaluated:
                print(
                    f"note: {run_dir} is left out of the reward-vs-KL plot: it has no eval.json (evaluate it with "
                    f"`epsdpo eval {run_dir}`)"
                )
        if evaluated:
            written.append(plot_reward_vs_kl(evaluated, out))
        else:
            print("note: no run has an eval.json, so there is no reward-vs-KL plot")
    except (FileNotFoundError, ValueError) as err:
        print(f"epsdpo plot: error: {err}")
        return 1
    for path in written:
        print(f"written: {path}")
    return 0


def _compare_training(runs: list[Path], out: Path) -> list[Path]:
    """``training_curves_compared.png`` of the runs with a ``metrics.jsonl``, when there are two or more."""
    from epsdpo.stages.plots import plot_training_comparison

    logged = [r for r in runs if (r / "metrics.jsonl").is_file()]
    if len(logged) < 2:
        return []
    return [plot_training_comparison(logged, out)]
