"""Gradient accumulation and β-DPO under every launcher this machine can run: one process, DDP (torchrun, gloo) and
DeepSpeed (ZeRO-2, gloo) against the single-process run; and the accumulation dispatch itself, with a fake
accelerator, for the launchers that need GPUs (FSDP)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from epsdpo.distributed import accumulation_boundary, configure_deepspeed, rank_slice
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
COMMON = ("disable_tqdm=true", "plot_after_training=false", "save_steps=0", "max_steps=4", f"dataset={DATA}")


DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}


def engine_steps(checkpoint: Path) -> int:
    """The optimizer steps DeepSpeed's engine took, from its own state in the checkpoint."""
    state = torch.load(checkpoint / "sharded" / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=True)
    return int(state["global_steps"])


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_process(tmp_path: Path, name: str, *overrides: str) -> Path:
    train(load_run_config(TINY, [f"output_dir={tmp_path / name}", *COMMON, *overrides]))
    return tmp_path / name


def two_processes(tmp_path: Path, name: str, *overrides: str, env: dict[str, str] | None = None) -> tuple[Path, str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "epsdpo.cli", "train", str(TINY)]
    cmd += [f"output_dir={tmp_path / name}", *COMMON, *overrides]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / name, proc.stdout + proc.stderr


def assert_same_training(a: Path, b: Path, keys: tuple[str, ...] = ("loss", "grad_norm", "rewards/margins")) -> None:
    """The same optimizer steps (one record per step), the same per-step values and the same final weights."""
    x, y = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in x] == [r["step"] for r in y]
    for r, s in zip(x, y, strict=True):
        assert r.get("kl/beta") == pytest.approx(s.get("kl/beta"), rel=1e-9), r["step"]
        for key in keys:
            if key in r:  # DeepSpeed sums the gradient norm over its partitions: equal to ~1e-5
                assert s[key] == pytest.approx(r[key], rel=5e-5, abs=1e-6), (r["step"], key)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        # Adam magnifies rounding where its second moment is tiny: ~1e-5 here; a wrong update count moves ~1e-3
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=3e-5, msg=name)


# ---- the accumulation dispatch, with a recording accelerator ------------------------------------------------------
class RecordingAccelerator:
    """What accelerate's backward sees: its ``sync_gradients`` flag and whether ``no_sync`` is active."""

    def __init__(self) -> None:
        self.sync_gradients = True
        self.in_no_sync = False
        self.gradient_state = SimpleNamespace(_set_sync_gradients=self._set)

    def _set(self, value: bool) -> None:
        self.sync_gradients = value

    @contextlib.contextmanager
    def no_sync(self, model):  # DDP's no_sync / FSDP2's set_requires_gradient_sync(False) in accelerate
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_accumulation_boundary_syncs_only_the_last_micro_batch_of_a_window():
    acc = RecordingAccelerator()
    seen = []
    for window in (3, 1):  # a full window, then a shorter last one of an epoch
        for i in range(window):
            with accumulation_boundary(acc, model=None, sync=i == window - 1):
                seen.append((acc.sync_gradients, acc.in_no_sync))  # what backward() sees
    # non-final micro-batches: no gradient all-reduce (DDP/FSDP) and no DeepSpeed engine step; the last: both
    assert seen == [(False, True), (False, True), (True, False), (True, False)]
    assert acc.sync_gradients and not acc.in_no_sync  # left as accelerate expects outside the loop


def fake_deepspeed(config: dict, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def test_deepspeed_config_is_filled_from_the_run_and_a_conflict_is_refused():
    config = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    configure_deepspeed(fake_deepspeed(config), micro_batch=3, max_grad_norm=0.5)
    assert config["gradient_accumulation_steps"] == 1  # epsdpo accumulates; the engine must not divide again
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 3
    assert config["train_batch_size"] == 6
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        configure_deepspeed(fake_deepspeed({"gradient_accumulation_steps": 4}), micro_batch=3, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gradient_clipping=1.0"):
        configure_deepspeed(fake_deepspeed({"gradient_clipping": 1.0}), micro_batch=3, max_grad_norm=0.5)


def test_rank_slice_takes_each_process_its_share_of_the_gathered_batch():
    gathered = torch.arange(6)
    assert rank_slice(gathered, 0, 2).tolist() == [0, 1, 2] and rank_slice(gathered, 1, 2).tolist() == [3, 4, 5]


# ---- end to end: 2 processes = 1 process --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[int, Path]:
    """One-process runs with 4 pairs per micro-batch, accumulation 1 and 3."""
    tmp = tmp_path_factory.mktemp("one")
    batch = "per_device_train_batch_size=4"
    return {acc: one_process(tmp, f"acc{acc}", batch, f"gradient_accumulation_steps={acc}") for acc in (1, 3)}


@pytest.mark.slow
def test_ddp_accumulation_matches_one_process(tmp_path, references):
    run, log = two_processes(tmp_path, "ddp", "per_device_train_batch_size=2", "gradient_accumulation_steps=3")
    assert "launcher='ddp'" in log
    assert_same_training(references[3], run)


@pytest.mark.slow
def test_ddp_selection_keeps_the_same_pairs_as_one_process(tmp_path):
    """The main process computes the implicit margins and fills the cache; the other reads it: same pairs kept."""
    select = ("selection=alignment_potential", "select_ratio=0.5")
    one = one_process(tmp_path, "one", *select, f"select_cache_dir={tmp_path / 'c1'}", "per_device_train_batch_size=4")
    two, _ = two_processes(
        tmp_path, "two", *select, f"select_cache_dir={tmp_path / 'c2'}", "per_device_train_batch_size=2"
    )
    assert (one / "selection_scores.jsonl").read_text() == (two / "selection_scores.jsonl").read_text()
    assert [p.name for p in (tmp_path / "c2").iterdir()] == [p.name for p in (tmp_path / "c1").iterdir()]
    assert_same_training(one, two)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 3])
def test_deepspeed_steps_once_per_window_and_matches_one_process(tmp_path, references, accumulation):
    pytest.importorskip("deepspeed")
    run, log = two_processes(
        tmp_path,
        f"ds{accumulation}",
        "per_device_train_batch_size=2",
        f"gradient_accumulation_steps={accumulation}",
        "save_steps=4",
        env=DEEPSPEED,
    )
    assert "launcher='deepspeed'" in log
    # the engine's own count of optimizer steps: one per window (an engine step per micro-batch would make it 12)
    assert engine_steps(run / "checkpoint-4") == 4
    # ... and would change every step after the first, and the final weights
    assert_same_training(references[accumulation], run)


@pytest.mark.slow
def test_deepspeed_resumes_from_its_sharded_checkpoint_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    args = ("per_device_train_batch_size=2", "gradient_accumulation_steps=3", "save_steps=2")
    full, _ = two_processes(tmp_path, "full", *args, env=DEEPSPEED)
    assert engine_steps(full / "checkpoint-2") == 2 and engine_steps(full / "checkpoint-4") == 4
    (tmp_path / "resumed").mkdir()
    shutil.copytree(full / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, _ = two_processes(tmp_path, "resumed", *args, "resume_from_checkpoint=auto", env=DEEPSPEED)
    x, y = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in y] == [3, 4]
    for r, s in zip(x[2:], y, strict=True):
        for key in ("loss", "grad_norm", "kl/beta", "rewards/margins"):
            assert s[key] == pytest.approx(r[key], rel=1e-6, abs=1e-7), (r["step"], key)
    wa, wb = (
        load_file(str(full / "final" / "model.safetensors")),
        load_file(str(resumed / "final" / "model.safetensors")),
    )
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-7, msg=name)


# ---- β-DPO: margins gathered and filtered once over processes; evaluation without collectives --------------------
@pytest.mark.slow
def test_beta_dpo_with_one_pair_per_process_filters_the_global_batch(tmp_path):
    one = one_process(tmp_path, "one", "loss_type=beta_dpo", "per_device_train_batch_size=2")
    two, _ = two_processes(tmp_path, "two", "loss_type=beta_dpo", "per_device_train_batch_size=1")
    x, y = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    # ⌊2 · (1 − 0.2)⌋ = 1 of the 2 pairs of each global batch, as in one process (locally: 1 of 1, nothing dropped)
    assert all(r["kl/pairs_kept"] == 0.5 for r in x) and all(r["kl/pairs_kept"] == 0.5 for r in y)
    logps = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
    for r, s in zip(x, y, strict=True):
        for key in ("loss", "kl/pair_beta"):
            assert s[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (r["step"], key)
        for key in logps:  # batches of 1 per process and of 2 in one take other float32 kernels: sums differ in ulps
            assert s[key] == pytest.approx(r[key], rel=1e-6), (r["step"], key)
        # a margin is β × a difference of those four sums (each ~150 nats), so its rounding error is relative to them,
        # not to the margin itself (~0.04): on an Intel Xeon with AMX it differed by 1.8e-6 = 5e-5 of the margin
        scale = r["kl/pair_beta"] * sum(abs(r[key]) for key in logps)
        assert s["rewards/margins"] == pytest.approx(r["rewards/margins"], rel=1e-5, abs=1e-6 * scale), r["step"]


@pytest.mark.slow
def test_beta_dpo_evaluates_an_uneven_split_without_hanging(tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(DATA.read_text().splitlines(keepends=True)[:33]))
    args = ("loss_type=beta_dpo", f"eval_dataset={held_out}", "per_device_eval_batch_size=4", "eval_steps=2")
    # 33 pairs over 2 processes in batches of 4: 5 batches on one, 4 on the other
    run, _ = two_processes(tmp_path, "two", *args, "per_device_train_batch_size=2")
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/pairs" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["eval/pairs"] == 33 for r in evals)
