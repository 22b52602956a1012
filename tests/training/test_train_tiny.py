"""`epsdpo train` on configs/tiny.yaml: learning, every loss, exact resume, signals, failures, 2 processes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epsdpo.cli import main as cli_main
from epsdpo.recipes.train import train
from epsdpo.training import TrainingError, load_run_config
from epsdpo.training.checkpoint import STATE_FILE, checkpoint_dirs
from epsdpo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
#: values that legitimately differ between two runs of the same computation
TIMING = {"tokens_per_second"}


def tiny(tmp_path: Path, name: str, *overrides: str):
    return load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / name}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "plot_after_training=false",
            *overrides,
        ],
    )


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_tiny_config_learns_and_moves_beta(tmp_path):
    result = train(tiny(tmp_path, "run", "max_steps=24", "save_steps=0", "plot_after_training=true"))
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 25))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < 0.5
    assert records[0]["kl/beta"] == 0.1 and result.beta < 0.095
    assert records[-1]["rewards/accuracies"] > 0.7
    required = {
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "kl/beta",
        "kl/steps_weaker",
        "kl/steps_stronger",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    }
    assert required <= set(records[-1])
    final = result.final_model_dir
    assert final is not None and (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    card = (final / "README.md").read_text()
    assert "epsilon_dpo" in card and "β after training" in card
    assert "## Training figures: mean over the last 3 logged steps (steps 22–24)" in card  # not the last step's
    assert (result.output_dir / "config.yaml").is_file() and (result.output_dir / "data_report.json").is_file()
    assert {p.name for p in result.plots} == {"training_curves.png", "beta.png"}  # training draws its own curves
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss", ["loss_type=dpo", "loss_type=cdpo label_smoothing=0.1", "loss_type=ipo", "loss_type=hinge"]
)
def test_every_loss_type_trains(tmp_path, loss):
    result = train(tiny(tmp_path, "run", "max_steps=12", "save_steps=0", *loss.split()))
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    assert result.beta == 0.1 and "kl/steps_weaker" not in records[-1]  # no ε-DPO state moves for baselines


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = train(
        tiny(
            tmp_path,
            "full",
            "max_steps=10",
            "save_steps=4",
            "gradient_accumulation_steps=2",
            "per_device_train_batch_size=5",
        )
    )
    # 64 pairs / 5 = 13 micro-batches (the last of 4 pairs) in windows of 2: step 7 is a window of one micro-batch
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full.output_dir / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = train(
        tiny(
            tmp_path,
            "resumed",
            "max_steps=10",
            "save_steps=4",
            "gradient_accumulation_steps=2",
            "per_device_train_batch_size=5",
            "resume_from_checkpoint=auto",
        )
    )
    a = comparable(read_metrics(full.output_dir / "metrics.jsonl"))
    b = comparable(read_metrics(resumed.output_dir / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(5, 11))
    assert a[4:] == b  # every logged value, bit for bit
    assert full.beta == resumed.beta
    state = json.loads((resumed.output_dir / "checkpoint-8" / STATE_FILE).read_text())
    assert (
        state["beta_controller"]["beta"]
        == json.loads((full.output_dir / "checkpoint-8" / STATE_FILE).read_text())["beta_controller"]["beta"]
    )


def _run_cli(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "epsdpo.cli",
        "train",
        str(TINY),
        f"output_dir={tmp_path / name}",
        f"dataset={DATA}",
        "disable_tqdm=true",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_leaves_complete_checkpoints_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    steps = ("max_steps=14", "save_steps=2", "save_total_limit=3")
    proc = _run_cli(tmp_path, "killed", *steps)
    _wait_for(tmp_path / "killed" / "checkpoint-6", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "killed"
    complete = checkpoint_dirs(run)
    assert complete, "no complete checkpoint survived"
    for ckpt in complete:  # every checkpoint under its final name is whole
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", STATE_FILE} <= {
            p.name for p in ckpt.iterdir()
        }
    assert len(complete) <= 3
    resumed = train(tiny(tmp_path, "killed", *steps, "resume_from_checkpoint=auto"))
    reference = train(tiny(tmp_path, "reference", *steps))
    assert comparable(read_metrics(resumed.output_dir / "metrics.jsonl")) == comparable(
        read_metrics(reference.output_dir / "metrics.jsonl")
    )
    assert resumed.beta == reference.beta


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed here")
def test_a_one_process_run_neither_imports_deepspeed_nor_prints_its_warning(tmp_path):
    """accelerate imports DeepSpeed to unwrap or save a model whenever it is installed; a one-process run (training,
    final save, evaluation) must not pay for it or print DeepSpeed's accelerator warning."""
    script = (
        "import sys\n"
        "from epsdpo.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    args = [str(TINY), f"output_dir={tmp_path / 'one'}", f"dataset={DATA}", "max_steps=2", "disable_tqdm=true"]
    args += ["plot_after_training=false", "eval_after_training=true", "eval_options.num_prompts=2"]
    args += ["eval_options.max_new_tokens=4", "eval_options.max_pairs=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deepspeed imported: False" in out.stdout
    assert "Setting accelerator" not in out.stdout + out.stderr
    assert (tmp_path / "one" / "final").is_dir() and (tmp_path / "one" / "eval.json").is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    proc = _run_cli(tmp_path, "term", "max_steps=400", "save_steps=0")
    _wait_for(tmp_path / "term" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted; checkpoint saved" in out
    (ckpt,) = checkpoint_dirs(tmp_path / "term")
    step = json.loads((ckpt / STATE_FILE).read_text())["global_step"]
    assert 1 <= step < 400 and not (tmp_path / "term" / "final").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    import epsdpo.training.loop as loop

    real = loop.compute_pair_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training micro-batch = optimizer step 3
            result.loss = result.loss._replace(losses=result.loss.losses * float("nan"))
        return result

    monkeypatch.setattr(loop, "compute_pair_losses", poisoned)
    with pytest.raises(TrainingError) as err:
        train(tiny(tmp_path, "nan", "max_steps=10", "save_steps=2"))
    message = str(err.value)
    assert "step 3" in message and "checkpoint-2" in message
    (ckpt,) = checkpoint_dirs(tmp_path / "nan")
    assert ckpt.name == "checkpoint-2"


def test_bad_config_key_suggests_the_closest_name(tmp_path, capsys):
    code = cli_main(["train", str(TINY), "max_step=3", f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 2 and "max_step" in out and "max_steps" in out


TRL_OVERRIDES = {  # every TRL / TrainingArguments name the issue lists, with a value and what it parses to
    "output_dir": ("x", "x"),
    "max_steps": ("7", 7),
    "num_train_epochs": ("2", 2.0),
    "per_device_train_batch_size": ("7", 7),
    "gradient_accumulation_steps": ("7", 7),
    "learning_rate": ("1e-5", 1e-5),
    "lr_scheduler_type": ("linear", "linear"),
    "warmup_ratio": ("0.2", 0.2),
    "weight_decay": ("0.01", 0.01),
    "max_grad_norm": ("0.5", 0.5),
    "logging_steps": ("7", 7),
    "eval_steps": ("7", 7),
    "save_steps": ("7", 7),
    "save_total_limit": ("7", 7),
    "seed": ("7", 7),
    "bf16": ("true", True),
    "gradient_checkpointing": ("true", True),
    "beta": ("0.05", 0.05),
    "loss_type": ("dpo", "dpo"),
    "label_smoothing": ("0.1", 0.1),
    "max_length": ("77", 77),
    "max_prompt_length": ("33", 33),
    "truncation_mode": ("keep_start", "keep_start"),
    "epsilon": ("0.02", 0.02),
}


@pytest.mark.parametrize("key", sorted(TRL_OVERRIDES))
def test_every_trl_name_is_a_top_level_override(key):
    text, expected = TRL_OVERRIDES[key]
    cfg = load_run_config(TINY, [f"{key}={text}"])
    (section,) = [s for s in (cfg.models, cfg.data, cfg.loss, cfg.train) if hasattr(s, key)]
    assert getattr(section, key) == expected


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and 2 pairs each = 1 process with 4 pairs: same β and losses."""
    one = train(tiny(tmp_path, "one", "max_steps=6", "save_steps=0"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "epsdpo.cli",
        "train",
        str(TINY),
        f"output_dir={tmp_path / 'two'}",
        f"dataset={DATA}",
        "disable_tqdm=true",
        "max_steps=6",
        "save_steps=3",
        "per_device_train_batch_size=2",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = read_metrics(one.output_dir / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 6  # one writer: rank 0
    for x, y in zip(a, b, strict=True):
        assert x["kl/beta"] == y["kl/beta"]
        for key in ("loss", "rewards/margins", "grad_norm", "logps/chosen", "kl/steps_weaker"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert {p.name for p in (tmp_path / "two" / "checkpoint-6").iterdir()} >= {"rng_state_0.pt", "rng_state_1.pt"}


@pytest.mark.slow
def test_lora_reference_is_the_base_and_matches_a_frozen_copy_at_step_0(tmp_path):
    full = train(tiny(tmp_path, "full", "max_steps=3", "save_steps=0"))
    lora = train(
        tiny(tmp_path, "lora", "max_steps=3", "save_steps=3", "use_lora=true", "lora_r=4", "save_merged_model=true")
    )
    a = read_metrics(full.output_dir / "metrics.jsonl")[0]
    b = read_metrics(lora.output_dir / "metrics.jsonl")[0]
    # Same seed, same initial weights; LoRA's B starts at 0, so at step 0 policy = base = reference in both runs.
    for key in ("logps/ref_chosen", "logps/ref_rejected", "logps/chosen", "logps/rejected", "loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    later = read_metrics(lora.output_dir / "metrics.jsonl")[2]  # after one update at the peak learning rate
    assert later["logps/ref_chosen"] != later["logps/chosen"]  # the adapters moved the policy, not the reference
    final = lora.final_model_dir
    assert (final / "adapter_model.safetensors").is_file() and (final / "merged" / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(lora.output_dir / "checkpoint-3" / "model.safetensors"), "pt") as fh:
        assert fh.keys() and all("lora_" in k for k in fh.keys())  # the checkpoint holds only the adapters


@pytest.mark.slow
def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    result = train(tiny(tmp_path, "bf16", "max_steps=8", "save_steps=0", "bf16=true", "gradient_checkpointing=true"))
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[-1]["rewards/margins"] > 0 and result.beta < 0.1


@pytest.mark.slow
def test_eval_metrics_and_tensorboard(tmp_path):
    result = train(
        tiny(
            tmp_path,
            "eval",
            "max_steps=4",
            "save_steps=0",
            "eval_steps=2",
            f"eval_dataset={DATA}",
            "per_device_eval_batch_size=16",
            "report_to=[tensorboard]",
        )
    )
    records = read_metrics(result.output_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # before the first step, every eval_steps, and once at the end
    for r in evals:
        assert {"eval/rewards/accuracies", "eval/rewards/margins", "eval/kl/steps_weaker"} <= set(r)
        assert not any(k.startswith("rewards/") for k in r)  # eval records carry only eval/ keys
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is the reference
    for r in evals[1:]:
        # each ± its standard error over the held-out pairs; the accuracy's the binomial one
        p, n = r["eval/rewards/accuracies"], r["eval/pairs"]
        assert r["eval/rewards/accuracies_se"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
        assert r["eval/loss_se"] > 0 and r["eval/rewards/margins_se"] > 0
    assert evals[-1]["eval/loss"] < evals[1]["eval/loss"] < math.log(2)  # held-out loss falls as training goes
    final = json.loads((result.final_model_dir / "final_metrics.json").read_text())
    assert {k: v for k, v in final.items() if k.startswith("eval/")} == {
        k: v for k, v in evals[-1].items() if k != "step"
    }
    events = list((result.output_dir).rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
