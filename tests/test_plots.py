"""`epsdpo plot`: PNG files from constructed metrics.jsonl / eval.json, with and without the optional keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epsdpo.cli import main as cli_main
from epsdpo.rundir import read_metrics_file
from epsdpo.stages.plots import (
    plot_reward_vs_kl,
    plot_training,
    reference_groups,
    smoothing_window,
    trailing_mean,
)

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def write_run(run: Path, epsilon_dpo: bool = True, held_out: bool = True, eval_result: dict | None = None) -> Path:
    run.mkdir(parents=True)
    records = []
    beta = 0.1
    for step in range(1, 21):
        record = {
            "step": step,
            "loss": 0.69 - 0.02 * step,
            "rewards/margins": 0.05 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.03 * step),
            "kl/beta": beta,
        }
        if epsilon_dpo:
            record.update({"kl/steps_weaker": 0.6, "kl/steps_stronger": 0.1, "kl/steps_kept": 0.3})
            beta /= 1 + 0.01 * 0.5
        records.append(record)
        if held_out and step % 10 == 0:
            records.append(
                {
                    "step": step,
                    "eval/loss": 0.7 - 0.01 * step,
                    "eval/rewards/margins": 0.03 * step,
                    "eval/rewards/accuracies": 0.6,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if eval_result is not None:
        (run / "eval.json").write_text(json.dumps(eval_result))
    return run


def result(kl: float, reward: float) -> dict:
    return {"kl": kl, "policy/gold_reward": reward, "policy/gold_reward_std": 0.2, "reference/gold_reward": 0.1}


def test_training_plots_of_an_epsilon_dpo_run(tmp_path):
    run = write_run(tmp_path / "eps")
    train, held_out = read_metrics_file(run)
    assert len(train) == 20 and len(held_out) == 2
    paths = plot_training(run)
    assert [p.name for p in paths] == ["training_curves.png", "beta.png"]
    assert all(p.parent == run / "plots" and is_png(p) for p in paths)


def test_training_plots_without_optional_keys(tmp_path):
    run = write_run(tmp_path / "dpo", epsilon_dpo=False, held_out=False)
    assert all(is_png(p) for p in plot_training(run))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")  # no margins, no β
    assert all(is_png(p) for p in plot_training(bare))


def test_reward_vs_kl_for_several_runs_and_missing_pieces(tmp_path):
    runs = [
        write_run(tmp_path / "a", eval_result=result(0.5, 0.4)),
        write_run(tmp_path / "b", eval_result=result(1.5, 0.7)),
    ]
    path = plot_reward_vs_kl(runs, tmp_path / "out")
    assert path == tmp_path / "out" / "reward_vs_kl.png" and is_png(path)
    single = {"kl": 0.2, "policy/gold_reward": 0.3}  # no std, no reference point
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval.json").write_text(json.dumps(single))
    assert is_png(plot_reward_vs_kl([tmp_path / "c"], tmp_path / "c.png"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "eval.json").write_text(json.dumps({"kl": 0.2}))
    with pytest.raises(ValueError, match="lacks 'kl' or 'policy/gold_reward'"):
        plot_reward_vs_kl([tmp_path / "d"], tmp_path)
    with pytest.raises(FileNotFoundError, match="epsdpo eval"):
        plot_reward_vs_kl([tmp_path / "nothing"], tmp_path)


def test_the_smoothed_curve_is_a_trailing_mean_ending_on_the_last_steps_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0, 9.0], 1) == [2.0, 4.0, 9.0]
    assert trailing_mean([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]
    assert trailing_mean([], 3) == []
    losses = [0.69, 0.5, 1.12, 0.4, 0.3, 0.9, 0.2, 1.12]  # the last step's value alone would mislead
    assert trailing_mean(losses, 4)[-1] == pytest.approx(sum(losses[-4:]) / 4)
    assert [smoothing_window(n) for n in (1, 7, 8, 32, 64)] == [1, 1, 1, 4, 8]
    with pytest.raises(ValueError):
        trailing_mean([1.0], 0)


def test_runs_against_different_references_get_one_reference_each():
    """Two runs of one base model share its star; a run of another base model (or another sampler seed) gets its own:
    no star at the mean of two references (a point that is no model)."""
    smol = {"reference": "smollm2", "reference/gold_reward": 0.485, "reference/gold_reward_se": 0.03}
    other = {"reference": "qwen", "reference/gold_reward": 0.115, "reference/gold_reward_se": 0.02}
    reseeded = {**smol, "reference/gold_reward": 0.47}
    groups = reference_groups([("a", smol), ("b", dict(smol)), ("c", other), ("d", reseeded), ("e", {})])
    assert [(g["name"], g["reward"], g["se"], g["runs"]) for g in groups] == [
        ("smollm2", 0.485, 0.03, ["a", "b"]),
        ("qwen", 0.115, 0.02, ["c"]),
        ("smollm2", 0.47, 0.03, ["d"]),
    ]


def test_cli_writes_per_run_plots_and_the_frontier_beside_the_runs(tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "a", eval_result=result(0.5, 0.4))
    b = write_run(tmp_path / "runs" / "b", epsilon_dpo=False)  # not evaluated: no point for it
    assert cli_main(["plot", str(a), str(b)]) == 0
    assert is_png(tmp_path / "runs" / "reward_vs_kl.png")
    printed = capsys.readouterr().out
    assert f"{b} is left out of the reward-vs-KL plot: it has no eval.json" in printed  # said, not silent
    assert f"{a} is left out" not in printed
    for run in (a, b):
        assert is_png(run / "plots" / "training_curves.png") and is_png(run / "plots" / "beta.png")
    assert is_png(tmp_path / "runs" / "training_curves_compared.png")  # both runs' curves together
    assert f"written: {tmp_path / 'runs' / 'training_curves_compared.png'}" in printed
    assert cli_main(["plot", str(a), "--out", str(tmp_path / "figs")]) == 0
    assert is_png(tmp_path / "figs" / "reward_vs_kl.png")
    assert cli_main(["plot", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().out


def test_training_curves_of_several_runs_on_shared_axes(tmp_path, monkeypatch):
    """Each run in its own colour on every panel both runs logged, named in the legend: its smoothed curve (the
    trailing mean over its own window), its raw values faint, its held-out points."""
    from matplotlib.figure import Figure

    from epsdpo.stages.plots import plot_training_comparison

    a = write_run(tmp_path / "x" / "seed0")
    b = write_run(tmp_path / "y" / "seed0", epsilon_dpo=False, held_out=False)
    drawn: list[Figure] = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kw: drawn.append(fig) or real_savefig(fig, *args, **kw))
    path = plot_training_comparison([a, b], tmp_path / "out")
    assert path == tmp_path / "out" / "training_curves_compared.png" and is_png(path)
    axes = drawn[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "preference accuracy", "reward margin", "β (KL penalty)"]
    loss = axes[0]
    legend = [t.get_text() for t in loss.get_legend().get_texts()]
    assert legend == ["x/seed0 (mean of 2 steps)", "y/seed0 (mean of 2 steps)"]  # same names: told apart
    solid = [line for line in loss.get_lines() if line.get_label().startswith(("x/", "y/"))]
    assert {line.get_color() for line in solid} == {"C0", "C1"}
    losses = [0.69 - 0.02 * s for s in range(1, 21)]  # write_run's loss per step; 20 steps → window 2
    assert list(solid[0].get_ydata()) == pytest.approx(trailing_mean(losses, 2))
    faint = [line for line in loss.get_lines() if line.get_alpha() == 0.25]
    assert len(faint) == 2 and list(faint[0].get_ydata()) == pytest.approx(losses)
    # run a's two held-out points (run b has none), in its colour
    points = [c for c in loss.containers if hasattr(c, "lines")]
    assert len(points) == 1 and list(points[0].lines[0].get_ydata()) == pytest.approx([0.6, 0.5])
    # a curve one run lacks is left out (said in the title); none in common is an error
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    drawn.clear()
    plot_training_comparison([a, bare], tmp_path / "two.png")
    assert [ax.get_title() for ax in drawn[0].axes] == ["loss"]
    assert "not logged by every run: rewards/accuracies, rewards/margins, kl/beta" in drawn[0]._suptitle.get_text()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 1, "grad_norm": 0.7}) + "\n")
    with pytest.raises(ValueError, match="no training curve in common"):
        plot_training_comparison([a, bare], tmp_path)
    with pytest.raises(ValueError, match="at least two"):
        plot_training_comparison([a], tmp_path)
