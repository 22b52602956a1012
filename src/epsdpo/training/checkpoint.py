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
directory; the checkpoints before it are untouched. A checkpoint damaged afterwards (a file cut short, deleted or
edited) is found by :func:`checkpoint_problem` before anything is loaded, and refused with the newest intact
checkpoint to resume from instead (:func:`check_checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import zipfile
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it, says why and what to resume from instead."""


#: the trainer state's keys and their types; the β controller's and β-DPO's required keys
_STATE_KEYS = {"global_step": int, "epoch": int, "window": int, "world_size": int, "global_batch": int}
_CONTROLLER_KEYS = ("beta", "epsilon", "rule", "pending", "num_updates")
_BETA_DPO_KEYS = ("beta", "alpha", "rho", "momentum", "running_mean", "running_std", "initialized", "last_beta")


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path``, or None when it is whole; tensors are not loaded: the trainer state
    is read and checked (keys, types, a finite β > 0, the step its name gives), every file it needs must be there,
    and each is checked against its own framing (a safetensors header against the file's size, a ``torch.save``
    archive's directory, which sits at its end), which a file cut short breaks."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} is not valid JSON ({err}); it was cut short or edited"
    problem = _state_problem(state, path)
    if problem is not None:
        return f"{STATE_FILE}: {problem}"
    files = ["scheduler.pt", *(f"rng_state_{r}.pt" for r in range(state["world_size"]))]
    if not (path / "sharded").is_dir():
        files += [MODEL_FILE, "optimizer.pt"]
    if (path / REFERENCE_FILE).exists():
        files.append(REFERENCE_FILE)
    for name in files:
        problem = _file_problem(path / name)
        if problem is not None:
            return f"{name} {problem}"
    return None


def _state_problem(state: Any, path: Path) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, kind in _STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            return f"{key} is {value!r}, not a count"
    if state["global_step"] < 1 or state["world_size"] < 1 or state["global_batch"] < 1:
        return "global_step, world_size and global_batch must be >= 1"
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != state["global_step"]:
        return f"global_step is {state['global_step']} in a checkpoint named {path.name}"
    controller = state.get("beta_controller")
    if not isinstance(controller, dict):
        return "the β controller's state (beta_controller) is missing"
    missing = [k for k in _CONTROLLER_KEYS if k not in controller]
    if missing:
        return f"the β controller's state lacks {missing}"
    beta = controller["beta"]
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not (math.isfinite(beta) and beta > 0):
        return f"the β controller's β is {beta!r}; β must be a finite number > 0"
    pending = controller["pending"]
    if not (isinstance(pending, list) and len(pending) == 3 and all(isinstance(c, int) and c >= 0 for c in pending)):
        return f"the β controller's pending counts are {pending!r}, not three counts"
    beta_dpo = state.get("beta_dpo")
    if beta_dpo is not None:
        if not isinstance(beta_dpo, dict) or any(k not in beta_dpo for k in _BETA_DPO_KEYS):
            return f"β-DPO's state lacks {[k for k in _BETA_DPO_KEYS if k not in (beta_dpo or {})]}"
        last = beta_dpo["last_beta"]
        if last is not None and not (isinstance(last, int | float) and math.isfinite(last)):
            return f"β-DPO's last β is {last!r}"
    return None


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be whole (missing, empty, cut short), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or length > size - 8:
                return f"is cut short ({size} bytes, less than its own header)"
            try:
                header = json.loads(fh.read(length))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return "has a damaged header"
        if 8 + length + end != size:
            return f"is {size} bytes where its header describes {8 + length + end}: cut short or damaged"
        return None
    try:  # torch.save writes a zip archive whose directory is its last part
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"is cut short or damaged ({size} bytes; {err})"
    if not members or any(m.header_offset + m.compress_size > size for m in members):
        return f"is cut short or damaged ({size} bytes)"
    return None


def check_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` once :func:`checkpoint_problem` finds nothing wrong and it was
    written by ``world_size`` processes; otherwise a :class:`CheckpointError` that names the newest intact
    checkpoint of its directory to resume from instead."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise damaged_checkpoint(path, problem)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} process(es); resume with the same number of processes "
            f"(now {world_size})"
        )
    return state


def damaged_checkpoint(path: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be used: what is wrong, and the newest intact one of its directory."""
    intact = [p for p in reversed(checkpoint_dirs(path.parent)) if p != path and checkpoint_problem(p) is None]
    if intact:
        advice = (
            f"The newest intact checkpoint is {intact[0]}: resume from it with resume_from_checkpoint={intact[0]} "
            f"(the steps after it are trained again), and move {path.name} away so that "
            "resume_from_checkpoint=auto does not pick it again"
        )
    else:
        advice = (
            f"No intact checkpoint is left in {path.parent}: start the run again (another output_dir, or "
            "overwrite_output_dir=true)"
        )
    return CheckpointError(f"checkpoint {path} cannot be resumed from: {problem}. {advice}.")


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
    """Restore weights and optimizer (``read_weights``), scheduler and this process's RNG; returns the trainer state.

    Check the checkpoint first (:func:`check_checkpoint`); what still fails to load here (a file whose framing is
    whole but whose content is not, or weights of another model) raises :class:`CheckpointError` naming the file
    and the newest intact checkpoint."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    rng_file = path / f"rng_state_{rank}.pt"
    world = state.get("world_size", 1)
    if rank >= world:
        raise CheckpointError(
            f"{path} was written by {world} process(es) and has no {rng_file.name}; resume with the same number "
            "of processes"
        )
    if not rng_file.is_file():
        raise damaged_checkpoint(path, f"{rng_file.name} is missing")
    try:
        read_weights(path)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(rng_file, weights_only=True))
    except Exception as err:  # torch, safetensors and pickle raise many kinds; each means the same here
        raise damaged_checkpoint(path, f"loading it failed ({type(err).__name__}: {err})") from err
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
