"""Metric helpers (training/metrics.py): sums, per-pair means, the metrics file and its truncation on resume."""

from __future__ import annotations

import json

import pytest

from epsdpo.training.metrics import PER_PAIR, MetricsWriter, add_sums, load_beta_schedule, pair_means, reduce_sums


def test_sums_add_and_means_divide_by_pairs():
    total: dict[str, float] = {}
    add_sums(total, {"pairs": 2.0, "loss": 1.0, "rewards/accuracies": 1.0})
    add_sums(total, {"pairs": 3.0, "loss": 2.0, "rewards/accuracies": 3.0})
    assert total == {"pairs": 5.0, "loss": 3.0, "rewards/accuracies": 4.0}
    means = pair_means(total, prefix="eval/")
    assert means == {"eval/loss": pytest.approx(0.6), "eval/rewards/accuracies": pytest.approx(0.8)}
    assert set(k.removeprefix("eval/") for k in means) <= set(PER_PAIR)


def test_reduce_in_one_process_keeps_values_and_fills_missing_keys_with_zero():
    assert reduce_sums({"pairs": 4.0, "loss": 2.5}, ("pairs", "loss", "tokens")) == {
        "pairs": 4.0,
        "loss": 2.5,
        "tokens": 0.0,
    }


def test_no_pairs_means_no_means():
    assert pair_means({"pairs": 0.0, "loss": 1.0}) == {}


def test_writer_appends_and_truncates_after_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, enabled=True)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0 / step})
    writer.truncate_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).write({"step": 1})  # not the main process: nothing
    assert not (tmp_path / "other.jsonl").exists()


def test_beta_schedule_from_a_file_or_a_run_directory(tmp_path):
    (tmp_path / "list.json").write_text("[0.1, 0.09, 0.08]")
    (tmp_path / "dict.json").write_text('{"beta": [0.1, 0.2]}')
    assert load_beta_schedule(tmp_path / "list.json") == [0.1, 0.09, 0.08]
    assert load_beta_schedule(tmp_path / "dict.json") == [0.1, 0.2]
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "kl/beta": 0.1}, {"step": 2, "kl/beta": 0.099}, {"step": 2, "eval/loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert load_beta_schedule(run) == [0.1, 0.099]
    (run / "metrics.jsonl").write_text('{"step": 1, "kl/beta": 0.1}\n{"step": 3, "kl/beta": 0.1}\n')
    with pytest.raises(ValueError, match=r"steps \[2\].*logging_steps=1"):
        load_beta_schedule(run)
    (tmp_path / "bad.json").write_text("[0.1, -1]")
    with pytest.raises(ValueError, match="step 2 has β = -1"):
        load_beta_schedule(tmp_path / "bad.json")
