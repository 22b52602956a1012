"""Checkpoints that are complete or absent, never half-written, and that resume a run exactly.

A checkpoint ``checkpoint-{step}/`` holds:

- ``model.safetensors``: the policy's trainable weights (all weights for full fine-tuning, the adapters for LoRA);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` (loaded with ``torch.load(weights_only=True)``);
  under FSDP / DeepSpeed the sharded model and optimizer are written by ``accelerate``'s ``save_state`` into
  ``sharded/`` instead (see :func:`save_checkpoint`'s ``write_weights``);
- ``rng_state_{rank}.pt``: torch, Python and NumPy generator states of each process;
- ``trainer_state.json``: step, data position, the BetaController, the world size, written last.

It is written into ``.checkpoint-{step}.partial/`` and renamed into place once every file is there, so a process
killed at any moment (even SIGKILL) leaves only complete checkpoints under their final names. A write that fails
for want of space removes the partial directory and raises :class:`epsdpo.errors.DiskFullError` naming the run
directory; the checkpoints before it are untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from epsdpo.errors import disk_full_guard

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"  # TR-DPO: the moved reference
_NAME = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: every parameter and buffer (full) or only trainable parameters (LoRA).

    Tied parameters (e.g. embeddings shared with the head) appear once, under their first name.
    """
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    items = list(model.named_parameters()) + (list(model.named_buffers()) if full else [])
    for name, tensor in items:
        if (not full and not tensor.requires_grad) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().cpu().contiguous()
    return out


def load_trainable_state(model: nn.Module, path: Path) -> None:
    """Copy the tensors of ``model.safetensors`` into ``model`` in place; every saved name must exist."""
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = sorted(set(saved) - set(params))
    if missing:
        raise KeyError(f"{path}: tensors {missing[:5]} are not in the model; was it saved from another model?")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """``auto`` → the latest complete checkpoint (or None), a path → that checkpoint (checked), None → None."""
    if spec is None:
        return None
    if spec == "auto":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r} is not a complete checkpoint (no {STATE_FILE}); "
            f"complete ones in {output_dir}: {[p.name for p in checkpoint_dirs(output_dir)] or 'none'}"
        )
    return path


def write_local_weights(
    directory: Path, model: nn.Module, full_weights: bool, optimizer: torch.optim.Optimizer
) -> None:
    """Model and optimizer of an unsharded run (call on rank 0): ``model.safetensors`` and ``optimizer.pt``."""
    save_file(trainable_state(model, full_weights), str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def read_local_weights(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of :func:`write_local_weights` (every rank reads the same files)."""
    load_trainable_state(model, directory / MODEL_FILE)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    write_weights: Callable[[Path], None],
    scheduler: Any,
    trainer_state: dict[str, Any],
    save_total_limit: int | None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically. Every process calls it; ``write_weights(dir)`` is called on every
    process too (a collective for sharded states; rank 0 alone writes for unsharded ones)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"

    def remove_partial() -> None:  # a failed write (a full disk) leaves no half checkpoint to fill the disk further
        shutil.rmtree(partial, ignore_errors=True)

    what = f"checkpoint-{step} (the last complete checkpoint is kept)"
    if rank == 0:
        remove_partial()
        with disk_full_guard(output_dir, what, remove_partial):
            partial.mkdir(parents=True)
    barrier()
    with disk_full_guard(output_dir, what, remove_partial):
        torch.save(rng_state(), partial / f"rng_state_{rank}.pt")
        write_weights(partial)
        if rank == 0:
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    barrier()
    if rank == 0:
        with disk_full_guard(output_dir, what, remove_partial):
            _write_json(partial / STATE_FILE, trainer_state)  # last: its presence marks the checkpoint complete
            _fsync_dir(partial)
        if final.exists():  # re-saving a step after a resume: replace the old one
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(output_dir)
        _rotate(output_dir, save_total_limit)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    *,
    rank: int,
    read_weights: Callable[[Path], None],
    scheduler: Any,
) -> dict[str, Any]:
    """Restore weights and optimizer (``read_weights``), scheduler and this process's RNG; returns the trainer state."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    read_weights(path)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by {state.get('world_size')} process(es); resume "
            "with the same number of processes"
        )
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for old in checkpoint_dirs(output_dir)[:-limit]:
        shutil.rmtree(old)
