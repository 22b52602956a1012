"""Everything that talks to other processes lives here, so the rest of the package stays single-process code."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


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
