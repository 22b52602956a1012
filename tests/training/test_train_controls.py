"""The controls that isolate ε-DPO's per-pair β (beta_schedule, freeze_global_beta) and the per-pair decision
records, end to end on configs/tiny.yaml."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from epsdpo.recipes.train import train
from epsdpo.stages.plots import decision_shares_by_margin, read_decisions
from epsdpo.training import TrainingError, load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


def tiny(tmp_path: Path, name: str, *overrides: str):
    common = [f"output_dir={tmp_path / name}", f"dataset={DATA}", "disable_tqdm=true", "save_steps=0", "max_steps=6"]
    return load_run_config(TINY, [*common, *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An ε-DPO run whose β moves (a large ε), with its per-pair decision records."""
    tmp = tmp_path_factory.mktemp("source")
    return train(tiny(tmp, "eps", "epsilon=0.2", "decision_records=true")).output_dir


@pytest.mark.slow
def test_a_replayed_schedule_reproduces_the_source_runs_beta_exactly(tmp_path, source):
    betas = [r["kl/beta"] for r in metrics(source)]
    assert len(set(betas)) > 2  # the source's β moved
    replay = train(tiny(tmp_path, "dpo", "loss_type=dpo", f"beta_schedule={source}", "plot_after_training=false"))
    assert [r["kl/beta"] for r in metrics(replay.output_dir)] == betas  # exactly, step by step
    assert replay.beta == betas[-1]
    # the DPO loss used the replayed β: its implicit rewards are β · (log-ratio), the source's β included
    first = metrics(replay.output_dir)[1]
    assert first["kl/pair_beta"] == pytest.approx(betas[1], rel=1e-7)
    with pytest.raises(TrainingError, match="holds 6 steps, this run has 8"):
        train(tiny(tmp_path, "long", "loss_type=dpo", f"beta_schedule={source}", "max_steps=8"))


@pytest.mark.slow
def test_a_replayed_schedule_resumes_on_the_sources_beta(tmp_path, source, caplog):
    betas = [r["kl/beta"] for r in metrics(source)]
    replay = ["loss_type=dpo", f"beta_schedule={source}", "plot_after_training=false"]
    full = train(tiny(tmp_path, "full", *replay, "save_steps=3"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full.output_dir / "checkpoint-3", resumed_dir / "checkpoint-3")
    with caplog.at_level(logging.INFO, logger="epsdpo.training.loop"):
        resumed = train(tiny(tmp_path, "resumed", *replay, "save_steps=3", "resume_from_checkpoint=auto"))
    assert [r["kl/beta"] for r in metrics(resumed.output_dir)] == betas[3:]  # steps 4-6 on the source's β
    assert [r["loss"] for r in metrics(resumed.output_dir)] == [r["loss"] for r in metrics(full.output_dir)][3:]
    assert betas[3] != 0.1
    assert f"at step 3 (next step's β = {betas[3]:.6g})" in caplog.text  # the replayed β, not the idle controller's


@pytest.mark.slow
def test_a_frozen_global_beta_never_moves_while_pairs_get_their_own(tmp_path):
    run = train(tiny(tmp_path, "frozen", "epsilon=0.2", "freeze_global_beta=true", "plot_after_training=false"))
    records = metrics(run.output_dir)
    assert all(r["kl/beta"] == 0.1 and r["kl/beta_next"] == 0.1 for r in records)
    assert run.beta == 0.1
    moved = [r for r in records if r["kl/steps_weaker"] + r["kl/steps_stronger"] > 0]
    assert moved and all(r["kl/pair_beta"] != pytest.approx(0.1, abs=1e-9) for r in moved)


@pytest.mark.slow
def test_decision_records_agree_with_the_logged_shares_and_are_plotted(source):
    records = read_decisions(source / "decisions.jsonl")
    logged = metrics(source)
    assert len(records) == 6 * 4  # every pair of every step (tiny: 4 pairs per step)
    for r in logged:
        mine = [d for d in records if d["step"] == r["step"]]
        assert sum(d["s"] == 1 for d in mine) / len(mine) == pytest.approx(r["kl/steps_weaker"])
        assert sum(d["s"] == -1 for d in mine) / len(mine) == pytest.approx(r["kl/steps_stronger"])
        assert sum(d["beta"] for d in mine) / len(mine) == pytest.approx(r["kl/pair_beta"], rel=1e-6)
    for d in records:  # s follows from the recorded gaps, and β̃ from s
        assert d["s"] == (
            1
            if d["weaker_gap"] > 0 and d["stronger_gap"] > 0
            else -1
            if d["weaker_gap"] < 0 and d["stronger_gap"] < 0
            else 0
        )
        assert d["beta"] == pytest.approx(
            [r for r in logged if r["step"] == d["step"]][0]["kl/beta"] / (1 + 0.2 * d["s"])
        )
    bins = decision_shares_by_margin(records, bins=4)
    assert sum(b["n"] for b in bins) == len(records)
    assert (source / "plots" / "decisions.png").is_file()
