"""experiments/trajectory_frontier.py: the plan, matched-KL interpolation, and the report from summaries alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tf():
    sys.path.insert(0, str(ROOT / "experiments"))  # as when run as a script: its helpers (_runs) beside it
    spec = importlib.util.spec_from_file_location(
        "trajectory_frontier", ROOT / "experiments" / "trajectory_frontier.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["trajectory_frontier"] = module
    spec.loader.exec_module(module)
    return module


def test_plan_is_seed_major_and_replays_the_same_seeds_beta(tf):
    runs = tf.plan()
    assert len(runs) == len(tf.METHODS) * len(tf.SEEDS) == len({r.name for r in runs})
    assert [r.seed for r in runs[: len(tf.METHODS)]] == [0] * len(tf.METHODS)
    replay = next(r for r in runs if r.method == "dpo_on_eps_beta" and r.seed == 2)
    assert "beta_schedule=runs/trajectory/eps-s2.beta.json" in replay.overrides and replay.needs == "eps-s2"
    names = [r.name for r in runs]
    assert names.index("eps-s0") < names.index("dpo_on_eps_beta-s0")  # the source is trained first


def test_replayed_beta_comes_from_the_committed_summary(tf, tmp_path, monkeypatch):
    from epsdpo.training.metrics import load_beta_schedule

    monkeypatch.setattr(tf, "ROOT", tmp_path)
    monkeypatch.setattr(tf, "SUMMARIES", tmp_path / "summaries")
    with pytest.raises(RuntimeError, match="run eps-s1 first"):
        tf.write_schedule("eps-s1")
    betas = [0.1, 0.1, 0.10037641154328733, 0.09938028338454664]  # float reprs round-trip exactly
    (tmp_path / "summaries").mkdir()
    (tmp_path / "summaries" / "eps-s1.json").write_text(json.dumps({"train": {"beta": betas}}))
    written = tf.write_schedule("eps-s1")
    assert written == tmp_path / tf.schedule_file("eps-s1")
    assert load_beta_schedule(written) == betas


def test_interpolation_along_a_trajectory(tf):
    points = [(1.0, 0.1), (3.0, 0.3), (2.0, 0.25)]
    assert tf.interpolate(points, 2.5) == pytest.approx(0.275)
    assert (
        tf.interpolate(points, 1.0) == 0.1 and tf.interpolate(points, 0.5) is None and tf.interpolate(points, 4) is None
    )


def summary(tf, method: str, seed: int, slope: float) -> dict:
    trajectory = [
        {
            "step": s,
            "kl": 0.5 * s / 8 * 4,
            "gold_reward_gain": slope * 0.5 * s / 8 * 4,
            "policy/gold_reward": 0.46 + slope * 0.5 * s / 8 * 4,
            "beta": 0.1,
            "reference/gold_reward": 0.46,
        }
        for s in tf.CHECKPOINTS
    ]
    train = {"beta": [0.1] * 64, "loss": [0.6] * 64, "accuracy": [0.5] * 64}
    if method.startswith("eps"):
        train.update({"s=+1": [0.5] * 64, "s=0": [0.25] * 64, "s=-1": [0.25] * 64})
    return {
        "name": f"{method}-s{seed}",
        "method": method,
        "seed": seed,
        "trajectory": trajectory,
        "train": train,
        "machine": "AMD EPYC (native bf16), 2 threads, torch 2",
        "commit": "abc",
        "seconds": {"train": 1.0, "eval": 2.0},
    }


def test_matched_kl_differences_are_paired_by_seed(tf):
    summaries = [summary(tf, "dpo", s, 0.05) for s in (0, 1)] + [summary(tf, "eps", s, 0.05 + 0.01 * s) for s in (0, 1)]
    rows = {(r["a"], r["b"], r["kl"]): r for r in tf.matched_differences(summaries)}
    at4 = rows["eps", "dpo", 4.0]
    assert at4["n"] == 2 and at4["diffs"] == pytest.approx([0.0, 0.04]) and at4["diff"] == pytest.approx(0.02)
    # se = sd / √2 = 0.02; with one degree of freedom the 95% t interval is ± 12.706 se
    assert at4["se"] == pytest.approx(0.02) and at4["ci"] == pytest.approx((0.02 - 0.25412, 0.02 + 0.25412))
    assert rows["eps", "dpo_on_eps_beta", 4.0]["n"] == 0  # not run yet: no number


def test_matched_kl_differences_leave_out_each_machines_reference_samples(tf):
    """A run made on another machine has other reference samples: its gain moves with their reward, its policy's
    reward does not, and the matched difference is taken on the latter."""
    dpo, eps = summary(tf, "dpo", 0, 0.05), summary(tf, "eps", 0, 0.06)
    for point in eps["trajectory"]:  # the same policy rewards, measured against a reference 0.006 lower
        point["reference/gold_reward"] = 0.454
        point["gold_reward_gain"] = point["policy/gold_reward"] - 0.454
    rows = {(r["a"], r["b"], r["kl"]): r for r in tf.matched_differences([dpo, eps])}
    assert rows["eps", "dpo", 4.0]["diffs"] == pytest.approx([0.04])  # 4 × (0.06 − 0.05), not 0.04 + 0.006


def test_report_is_rebuilt_from_summaries(tf, tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "RESULTS", tmp_path)
    summaries = [summary(tf, m, s, 0.05) for m in ("dpo", "eps", "eps_frozen") for s in (0, 1)]
    md, png = tf.report(summaries)
    text = md.read_text()
    assert png.is_file() and f"Runs done: 6 of {len(tf.plan())}" in text and "ε-DPO (float32 decisions) − DPO" in text
    assert "0.50 / 0.25 / 0.25" in text and json.dumps(summaries)  # shares over training
    # two seeds with equal differences: a zero-width t interval; the reference's reward is named in the setup
    assert "0.000 ± 0.000, [+0.000, +0.000] (n 2" in text and "the reference's is 0.460)" in text


def test_report_says_how_far_a_method_that_never_reaches_the_matched_kl_went(tf, tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "RESULTS", tmp_path)
    orpo = summary(tf, "orpo", 0, 0.05)
    kls = [0.3, 0.5, 1.2, 0.4, 0.5, 0.6, 0.3, 0.2]
    for point, kl, reward in zip(orpo["trajectory"], kls, [0.44, 0.5] * 4, strict=True):
        point["kl"], point["policy/gold_reward"] = kl, reward
    text = tf.report([summary(tf, "dpo", 0, 0.05), orpo])[0].read_text()
    assert "- ORPO (λ 0.1): no run reaches KL 2 in 64 steps (1 run; KL at most 1.20 at any checkpoint" in text
    assert "gold reward 0.440–0.500 against the reference's 0.460)" in text and "- DPO: no run" not in text


def test_report_names_each_machines_reference_samples(tf, tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "RESULTS", tmp_path)
    summaries = [summary(tf, m, 0, 0.05) for m in ("dpo", "eps")]
    text = tf.report(summaries)[0].read_text()
    assert "Reference model (the same samples for every run): gold reward 0.460." in text
    other = summary(tf, "eps_published", 0, 0.05)
    other["machine"] = "Intel(R) Xeon(R) Processor (native bf16), 2 threads, torch 2"
    for point in other["trajectory"]:
        point["reference/gold_reward"] = 0.4586
    text = tf.report([*summaries, other])[0].read_text()
    assert "different reference samples" in text and "the policies' own gold rewards" in text
    assert "- reference gold reward 0.459 (1 run; Intel(R) Xeon(R) Processor (native bf16), 2 threads" in text
    assert "- reference gold reward 0.460 (2 runs; AMD EPYC (native bf16), 2 threads, torch 2): dpo-s0, eps-s0" in text
    assert "- eps_published-s0: Intel Xeon, commit abc" in text


def test_tasks_wait_for_their_training_the_replayed_source_and_the_reference(tf):
    todo = ["eps-s3", "dpo_on_eps_beta-s3", "dpo-s3"]
    assert tf.Run.named("dpo_on_eps_beta-s3") == tf.Run("dpo_on_eps_beta", 3)
    after = {t.name: t.after for name in todo for t in tf.tasks(tf.Run.named(name), todo, 4)}
    assert after["eps-s3:train"] == () and after["eps-s3:eval-8"] == ("eps-s3:train",)  # the first writes the cache
    assert after["eps-s3:eval-16"] == ("eps-s3:train", "eps-s3:eval-8")
    assert after["dpo-s3:eval-64"] == ("dpo-s3:train", "eps-s3:eval-8")
    assert after["dpo_on_eps_beta-s3:train"] == ("eps-s3:summary",)  # its β comes from that summary
    assert after["dpo-s3:summary"] == tuple(f"dpo-s3:eval-{s}" for s in tf.CHECKPOINTS)
    alone = tf.tasks(tf.Run("dpo_on_eps_beta", 3), ["dpo_on_eps_beta-s3"], 1)  # its source summarised already
    assert alone[0].after == ()


def test_plan_takes_further_seeds_after_the_grid(tf):
    names = [r.name for r in tf.plan((0, 1, 2, 3))]
    assert names[: len(tf.plan())] == [r.name for r in tf.plan()] and names[-1] == f"{list(tf.METHODS)[-1]}-s3"


def test_the_grid_runs_as_parallel_tasks_end_to_end(tf, tiny_model_dir, tmp_path, monkeypatch):
    """``--jobs 2`` on a tiny random model through the real CLI: the replay's source is summarised before the replay
    trains, the replay equals its source's β, every task is timed, and the summaries and the report are written."""
    import _runs
    import torch

    (tmp_path / "tiny.yaml").write_text(
        f"model: {tiny_model_dir}\ndataset: bundled:sentiment_pairs\nmax_length: 64\nmax_prompt_length: 32\n"
        "beta: 0.1\nmax_steps: 2\nper_device_train_batch_size: 2\nsave_steps: 1\nlogging_steps: 1\n"
        "disable_tqdm: true\nplot_after_training: false\neval_after_training: false\n"
    )
    evaluation = [
        *(e for e in tf.EVAL if e.split("=")[0] in ("eval_dataset", "seed", "disable_tqdm", "reference_cache_dir")),
        *("num_prompts=3", "samples_per_prompt=2", "max_pairs=4", "max_new_tokens=6", "batch_size=8"),
    ]
    results = tmp_path / "results"
    for module, name, value in [
        (tf, "ROOT", tmp_path),
        (_runs, "ROOT", tmp_path),
        (tf, "RESULTS", results),
        (tf, "SUMMARIES", results / "trajectory"),
        (tf, "CONFIG", Path("tiny.yaml")),
        (tf, "CHECKPOINTS", (1, 2)),
        (tf, "EVAL", evaluation),
        (tf, "METHODS", {m: tf.METHODS[m] for m in ("dpo_on_eps_beta", "eps")}),  # the replay first in the plan
    ]:
        monkeypatch.setattr(module, name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["trajectory_frontier.py", "--jobs", "2", "--seeds", "0"])
    threads = torch.get_num_threads()
    try:
        tf.main()
    finally:
        torch.set_num_threads(threads)
    source, replay = (
        json.loads((results / "trajectory" / f"{n}.json").read_text()) for n in ("eps-s0", "dpo_on_eps_beta-s0")
    )
    assert replay["train"]["beta"] == source["train"]["beta"] and len(source["train"]["beta"]) == 2
    assert [p["step"] for p in replay["trajectory"]] == [1, 2] and replay["seconds"]["jobs"] == 2
    assert replay["seconds"]["train"] > 0 and replay["seconds"]["eval"] > 0 and "1 threads" in replay["machine"]
    evals = [json.loads((tmp_path / tf.RUNS / "eps-s0" / f"eval-checkpoint-{s}.json").read_text()) for s in (1, 2)]
    assert all(e["reference_cache"] for e in evals)
    assert "Runs done: 2 of 6" in (results / "trajectory_frontier.md").read_text()
