"""Everything that talks to other processes lives here, so the rest of the package stays single-process code."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """The device a collective must run on: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_processes(values: Tensor) -> Tensor:
    """Element-wise sum of ``values`` over all processes (a copy on every rank); identity in a single process.

    Used for counters (β controller decisions, metric sums), so it runs in float64 to keep integer counts exact.
    """
    if not is_distributed():
        return values.clone()
    buffer = values.detach().to(device=_collective_device(), dtype=torch.float64)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(device=values.device, dtype=values.dtype)


def gather_across_processes(values: Tensor) -> Tensor:
    """``values`` (n, …) of every process concatenated in rank order, (world·n, …), on every rank; a copy in one
    process. Every process must pass the same shape (the loop's training micro-batches are equal by construction)."""
    if not is_distributed():
        return values.detach().clone()
    local = values.detach().to(_collective_device())
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(values.device)


def rank_slice(values: Tensor, rank: int, world: int) -> Tensor:
    """This process's equal share of a tensor gathered with :func:`gather_across_processes`."""
    n = values.shape[0] // world
    return values[rank * n : (rank + 1) * n]


# ---- accelerate: the launcher and gradient accumulation --------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def deepspeed_requested() -> bool:
    """Whether this process was launched for DeepSpeed (``accelerate launch`` with a DeepSpeed config sets
    ``ACCELERATE_USE_DEEPSPEED``; with torchrun, set it yourself)."""
    return _env_flag("ACCELERATE_USE_DEEPSPEED")


def make_accelerator(use_cpu: bool, bf16: bool, project_dir: str) -> Any:
    """The run's ``Accelerator`` for whichever launcher started the processes (one process, DDP, FSDP, DeepSpeed).

    On a machine without a GPU, DeepSpeed needs ``cpu=False`` (``cpu=True`` silently turns it off in accelerate)
    and an explicit gloo process group; everything else runs with ``cpu=True``, which is what makes accelerate set
    up gloo for several CPU processes (torchrun / accelerate launch). accelerate enables FSDP only on accelerators
    (GPUs and the like): an FSDP launch on CPUs trains as DDP, which is said in a warning. Experiment trackers are
    epsdpo's own (:mod:`epsdpo.training.trackers`), not accelerate's.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and not use_cpu
    handlers = []
    cpu = not cuda
    if deepspeed_requested() and not cuda:
        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if _env_flag("ACCELERATE_USE_FSDP") and not cuda:
        logger.warning(
            "FSDP was requested, but accelerate enables FSDP only on GPUs (and other accelerators): on CPUs the "
            "processes train as DDP (the same updates, each holding the whole model)"
        )
    return Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if bf16 else "no",
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )


@contextlib.contextmanager
def deepspeed_left_alone(accelerator: Any) -> Iterator[None]:
    """In a run that does not use DeepSpeed, keep accelerate from importing it.

    accelerate's ``extract_model_from_parallel`` (behind ``accelerator.unwrap_model`` and transformers'
    ``save_pretrained``) imports DeepSpeed whenever it is installed, to recognise its engine: for a one-process run that
    costs seconds and prints DeepSpeed's "Setting accelerator to CPU" warning. For the duration, accelerate is told
    DeepSpeed is not installed (the engine it would look for cannot be there); a DeepSpeed run is left as it is.
    """
    from accelerate.utils import DistributedType, other

    if accelerator.distributed_type == DistributedType.DEEPSPEED or not hasattr(other, "is_deepspeed_available"):
        yield
        return
    original = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = original


def configure_deepspeed(accelerator: Any, micro_batch: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from the run's settings before ``prepare`` (no data loader is prepared, so
    accelerate cannot infer them), and refuse values that would train differently from what the config says.

    epsdpo accumulates gradients itself (its loss is already normalised by the window's pair count): DeepSpeed's own
    ``gradient_accumulation_steps`` must stay 1 (``auto``), or the engine would divide the loss again; the engine
    steps once per window because :func:`accumulation_boundary` tells it where windows end.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    expected = {"gradient_accumulation_steps": 1, "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in expected.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ValueError(
                f"the DeepSpeed config sets {key}={given}, the run {value}; set it to 'auto' in the DeepSpeed config "
                "and use epsdpo's gradient_accumulation_steps / max_grad_norm"
            )
        ds[key] = value
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["train_batch_size"] = micro_batch * accelerator.num_processes


@contextlib.contextmanager
def accumulation_boundary(accelerator: Any, model: Any, sync: bool) -> Iterator[None]:
    """One micro-batch of a gradient-accumulation window; ``sync`` on the window's last one only.

    DDP and FSDP skip their gradient all-reduce on the other micro-batches (``no_sync``). DeepSpeed's wrapper steps
    the engine in ``backward`` when accelerate's ``sync_gradients`` is true, so the flag is set for every micro-batch
    (accelerate's ``accumulate()`` would set it by counting micro-batches, which a shorter last window of an epoch
    breaks); without it the engine would take an optimizer step per micro-batch.
    """
    accelerator.gradient_state._set_sync_gradients(sync)
    try:
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)
