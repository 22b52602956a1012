"""The embedded default: bundled datasets and config, and a run that trains, evaluates and plots by itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from epsdpo.assets import bundled_config, bundled_dataset
from epsdpo.data import DataError
from epsdpo.data.loading import load_rows
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


def test_bundled_default_config_is_the_smollm2_sentiment_job():
    cfg = load_run_config(bundled_config("default"))
    assert cfg.models.model == "smollm2-135m-instruct" and cfg.loss.loss_type == "epsilon_dpo"
    assert cfg.data.dataset == "bundled:sentiment_pairs" and cfg.train.eval_after_training
    for name in (cfg.data.dataset, cfg.data.eval_dataset):
        assert Path(bundled_dataset(name)).is_file()


def test_bundled_dataset_names_resolve_and_unknown_ones_say_what_exists():
    rows = load_rows("bundled:sentiment_pairs")
    assert len(rows.rows) > 0 and {"prompt", "chosen", "rejected"} <= set(rows.rows[0])
    with pytest.raises(DataError, match="bundled datasets: .*sentiment_pairs"):
        load_rows("bundled:no_such_data")


@pytest.mark.slow
def test_a_run_evaluates_and_plots_itself(tmp_path):
    cfg = load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / 'run'}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "max_steps=4",
            "save_steps=0",
            "eval_after_training=true",
            "eval_options={num_prompts: 4, max_new_tokens: 6, batch_size: 4}",
            "warmup_ratio=0.25",
            "lr_scheduler_type=cosine",
        ],
    )
    result = train(cfg)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    # step 1 starts from policy = reference (loss ln 2); with one warm-up step at lr/2 the first step already
    # changes the model, so step 2's loss is no longer ln 2 (Hugging Face's warm-up would leave it there)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(records[1]["loss"] - math.log(2)) > 1e-5
    assert records[0]["learning_rate"] == pytest.approx(cfg.train.learning_rate)  # the rate of step 2 (after)
    evaluation = json.loads((result.output_dir / "eval.json").read_text())
    assert evaluation["name"] == "after-training"
    assert (result.output_dir / "evals" / "after-training" / "samples.jsonl").is_file()
    for key in ("policy/gold_reward", "reference/gold_reward", "kl", "win_rate", "preference_accuracy"):
        assert key in evaluation
    assert result.eval_metrics is not None and result.eval_metrics["kl"] == evaluation["kl"]
    assert {p.name for p in result.plots} == {"training_curves.png", "beta.png", "reward_vs_kl.png"}
