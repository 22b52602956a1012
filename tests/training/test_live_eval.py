"""The in-training generation evaluation (``eval_generation``), the step-0 held-out point and ``stop_at_kl``."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epsdpo.cli import main as cli_main
from epsdpo.config import ConfigError
from epsdpo.recipes.live_eval import generation_record
from epsdpo.recipes.train import train
from epsdpo.rundir import read_generation_evaluations, read_metrics_file
from epsdpo.stages.evaluate import evaluate
from epsdpo.training import load_run_config
from epsdpo.training.checkpoint import checkpoint_dirs
from epsdpo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
#: the in-training evaluation's sampling settings (``eval_options``), small enough for a test
OPTIONS = "eval_options={max_new_tokens: 8, batch_size: 4, samples_per_prompt: 2}"
#: values that legitimately differ between two runs of the same computation
TIMING = {"tokens_per_second", "gen/seconds"}


def live(tmp_path: Path, name: str, *overrides: str):
    return load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / name}",
            f"dataset={DATA}",
            f"eval_dataset={DATA}",
            "per_device_eval_batch_size=16",
            "disable_tqdm=true",
            "plot_after_training=false",
            "max_steps=4",
            "save_steps=2",
            "eval_steps=2",
            "eval_generation=true",
            "eval_generation_prompts=3",
            OPTIONS,
            f"eval_options.reference_cache_dir={tmp_path / 'eval_reference'}",
            *overrides,
        ],
    )


def steps_of(records: list[dict], prefix: str) -> list[int]:
    return [r["step"] for r in records if any(k.startswith(prefix) for k in r)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tuning run with the in-training evaluation at steps 0, 2 and 4, and its plots."""
    tmp = tmp_path_factory.mktemp("live")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(live(tmp, "run", "plot_after_training=true"))
    return tmp, result, printed.getvalue()


# ---- the config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval_generation=true"], "eval_generation=true evaluates at step 0, every eval_steps"),
        (["eval_steps=2", "stop_at_kl=1.0"], "stop_at_kl needs the KL measured during training"),
        (["eval_steps=2", "eval_generation=true", "stop_at_kl=0"], "stop_at_kl must be a KL budget > 0"),
        (["eval_steps=2", "eval_generation=true", "stop_at_kl=nan"], "stop_at_kl.: nan is not a finite number"),
        (["eval_steps=2", "eval_generation=true", "eval_generation_prompts=0"], "eval_generation_prompts must be"),
        (["eval_steps=2", "eval_generation=true", "sync_ref_model=true"], "cannot be used with sync_ref_model"),
    ],
)
def test_config_errors_are_found_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(TINY, [f"output_dir={tmp_path}", *overrides])


def test_generation_record_names_the_evaluation_figures():
    metrics = {
        "policy/gold_reward": 0.5,
        "policy/gold_reward_se": 0.1,
        "reference/gold_reward": 0.2,
        "kl": 1.5,
        "kl_se": 0.3,
        "kl/forward": 1.2,
        "win_rate": 0.6,
        "win_rate_se": 0.05,
        "win_rate_ci95": [0.5, 0.7],
        "policy/distinct_2": 0.9,
        "preference_accuracy": None,
        "beta": 0.1,
        "num_prompts": 3,
    }
    assert generation_record(metrics) == {
        "gen/gold_reward": 0.5,
        "gen/gold_reward_se": 0.1,
        "gen/reference_gold_reward": 0.2,
        "gen/kl": 1.5,
        "gen/kl_se": 0.3,
        "gen/kl_forward": 1.2,
        "gen/win_rate": 0.6,
        "gen/win_rate_se": 0.05,
        "gen/distinct_2": 0.9,
        "gen/num_prompts": 3,
    }


# ---- one run ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluations_at_step_0_every_eval_steps_and_the_last_step(full_run):
    tmp, result, printed = full_run
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert steps_of(records, "gen/") == [0, 2, 4]
    assert steps_of(records, "eval/") == [0, 2, 4]  # the held-out curve starts before the first update
    for record in read_generation_evaluations(result.output_dir):
        for key in ("gold_reward", "kl", "win_rate", "gold_reward_gain", "reference_gold_reward"):
            assert isinstance(record[f"gen/{key}"], float) and record[f"gen/{key}_se"] >= 0, key
        assert 0 <= record["gen/distinct_2"] <= 1 and record["gen/num_prompts"] == 3
        assert not any(k.startswith(("eval/", "loss", "rewards/")) for k in record)
    gen = read_generation_evaluations(result.output_dir)
    # the reference's side is computed once and reused: the same at every evaluation
    assert len({(r["gen/reference_gold_reward"], r["gen/reference_distinct_2"]) for r in gen}) == 1
    assert gen[0]["gen/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is its reference at step 0
    train_records, held_out = read_metrics_file(result.output_dir)  # gen/ records are neither
    assert [r["step"] for r in train_records] == [1, 2, 3, 4] and [r["step"] for r in held_out] == [0, 2, 4]
    assert (result.output_dir / "plots" / "trajectory.png").is_file()
    assert f"epsdpo plot {result.output_dir}" in printed  # where to look while it runs


@pytest.mark.slow
def test_last_evaluation_equals_epsdpo_eval_of_the_final_model(full_run):
    """The in-training evaluation at the last step and ``epsdpo eval`` of the saved final model with the same settings
    (eval_options on the same prompts) agree figure for figure: one implementation, the same samples."""
    tmp, result, _ = full_run
    last = read_generation_evaluations(result.output_dir)[-1]
    after = evaluate(
        result.output_dir,
        [
            "max_new_tokens=8",
            "batch_size=4",
            "samples_per_prompt=2",
            "num_prompts=3",
            "name=same-settings",
            "disable_tqdm=true",
            f"reference_cache_dir={tmp / 'eval_reference'}",
        ],
    )
    expected = {k: v for k, v in generation_record(after).items() if k not in TIMING}
    compared = {k: v for k, v in expected.items() if k in last}
    pairs = {f"gen/{k}{se}" for k in ("preference_accuracy", "reward_margin") for se in ("", "_se")}
    assert set(compared) == set(expected) - pairs  # the held-out pairs are the trainer's own records (eval/)
    for key, value in compared.items():
        assert last[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key in ("gen/gold_reward", "gen/kl", "gen/win_rate", "gen/distinct_2"):
        assert key in compared


@pytest.mark.slow
def test_plot_draws_the_trajectories_of_one_run_and_of_several(full_run, tmp_path):
    _, result, _ = full_run
    other = tmp_path / "other"
    shutil.copytree(result.output_dir, other, ignore=shutil.ignore_patterns("checkpoint-*", "final", "plots"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli_main(["plot", str(other)]) == 0
        assert cli_main(["plot", str(result.output_dir), str(other), "--out", str(tmp_path / "both")]) == 0
    assert (other / "plots" / "trajectory.png").stat().st_size > 0
    assert (tmp_path / "both" / "trajectory.png").stat().st_size > 0
    assert "trajectory.png" in out.getvalue()


@pytest.mark.slow
def test_resume_keeps_the_earlier_evaluations_and_repeats_none(full_run, tmp_path):
    """A run killed after step 3 (no checkpoint 4) resumes from checkpoint 2: its evaluations of steps 0 and 2 stay
    as they were, none is made again, and the rest of the run is the uninterrupted run's."""
    tmp, result, _ = full_run
    full = read_metrics(result.output_dir / "metrics.jsonl")
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(result.output_dir / "checkpoint-2", killed / "checkpoint-2")
    shutil.copy(result.output_dir / "config.yaml", killed / "config.yaml")
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(line for line, r in zip(lines, full, strict=True) if r["step"] <= 3))
    before = read_generation_evaluations(killed)
    resumed = train(live(tmp, "x", f"output_dir={killed}", "resume_from_checkpoint=auto"))
    records = read_metrics(resumed.output_dir / "metrics.jsonl")
    assert steps_of(records, "gen/") == [0, 2, 4] and steps_of(records, "eval/") == [0, 2, 4]
    gen = read_generation_evaluations(killed)
    assert gen[:2] == before[:2]  # kept as written, with their own timings
    drop = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert len(records) == len(full)
    for got, want in zip(drop(records), drop(full), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), want["step"]


# ---- the run trains as it would without it -----------------------------------------------------------------------
@pytest.mark.slow
def test_training_is_the_same_with_and_without_the_evaluation(tmp_path):
    """LoRA with dropout (the training draws random numbers every step): the losses, β and the held-out figures of a
    run with the in-training evaluation are those of the same run without it, exactly."""
    lora = ("use_lora=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.2", "save_steps=0")
    with_it = train(live(tmp_path, "with", *lora))
    without = train(live(tmp_path, "without", *lora, "eval_generation=false"))
    a = [r for r in read_metrics(with_it.output_dir / "metrics.jsonl") if not any(k.startswith("gen/") for k in r)]
    b = read_metrics(without.output_dir / "metrics.jsonl")
    assert steps_of(read_metrics(with_it.output_dir / "metrics.jsonl"), "gen/") == [0, 2, 4]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in b
    ]
    assert with_it.beta == without.beta


# ---- the KL budget ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_at_kl_ends_the_run_as_a_finished_one(tmp_path):
    cfg = live(tmp_path, "budget", "max_steps=6", "save_steps=0", "learning_rate=0.05", "stop_at_kl=0.05")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(cfg)
    gen = read_generation_evaluations(result.output_dir)
    assert gen[-1]["gen/kl"] > 0.05 and all(r["gen/kl"] <= 0.05 for r in gen[:-1])
    stop = gen[-1]["step"]
    assert 0 < stop < 6 and result.global_step == stop and not result.interrupted
    assert f"after step {stop}" in printed.getvalue() and "stop_at_kl=0.05" in printed.getvalue()
    assert result.stopped_at_kl is not None and "of 6" in result.stopped_at_kl
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert max(r["step"] for r in records) == stop and steps_of(records, "eval/")[-1] == stop
    assert len([s for s in steps_of(records, "eval/") if s == stop]) == 1  # the held-out pass is not written twice
    assert (result.output_dir / "final" / "final_metrics.json").is_file()
    assert [p.name for p in checkpoint_dirs(result.output_dir)] == [f"checkpoint-{stop}"]
    # asked to resume, the finished run is left as it is
    again = train(live(tmp_path, "x", f"output_dir={result.output_dir}", "max_steps=6", "save_steps=0",
                       "learning_rate=0.05", "stop_at_kl=0.05", "resume_from_checkpoint=auto"))  # fmt: skip
    assert again.already_finished and again.global_step == stop
    # killed after its checkpoint, before final/: the resumed run takes no further step and finishes
    shutil.rmtree(result.output_dir / "final")
    resumed = train(live(tmp_path, "x", f"output_dir={result.output_dir}", "max_steps=6", "save_steps=0",
                         "learning_rate=0.05", "stop_at_kl=0.05", "resume_from_checkpoint=auto"))  # fmt: skip
    assert resumed.global_step == stop and (result.output_dir / "final" / "final_metrics.json").is_file()
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert max(r["step"] for r in records) == stop
    assert [s for s in steps_of(records, "eval/") if s == stop] == [stop]  # measured once, kept, not written again
    assert [s for s in steps_of(records, "gen/") if s == stop] == [stop]


# ---- two processes ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_evaluate_on_the_main_process_without_a_collective_mismatch(tmp_path):
    """torchrun, 2 processes (gloo): only the main process samples, the other waits at the barrier; the run ends (no
    hang), records each evaluation once, and its last one is ``epsdpo eval`` of the final model's."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "two"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "epsdpo.cli", "train", str(TINY)]
    cmd += [
        f"output_dir={run}",
        f"dataset={DATA}",
        f"eval_dataset={DATA}",
        "per_device_train_batch_size=2",
        "per_device_eval_batch_size=16",
        "disable_tqdm=true",
        "plot_after_training=false",
        "max_steps=4",
        "save_steps=0",
        "eval_steps=2",
        "eval_generation=true",
        "eval_generation_prompts=3",
        OPTIONS,
        f"eval_options.reference_cache_dir={tmp_path / 'eval_reference'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert steps_of(records, "gen/") == [0, 2, 4] and steps_of(records, "eval/") == [0, 2, 4]
    last = read_generation_evaluations(run)[-1]
    options = ["max_new_tokens=8", "batch_size=4", "samples_per_prompt=2", "num_prompts=3", "disable_tqdm=true"]
    after = evaluate(run, [*options, "name=same-settings", f"reference_cache_dir={tmp_path / 'eval_reference'}"])
    for key in ("gen/gold_reward", "gen/kl", "gen/win_rate", "gen/distinct_2", "gen/gold_reward_gain_se"):
        assert last[key] == pytest.approx(generation_record(after)[key], rel=1e-5, abs=1e-6), key
