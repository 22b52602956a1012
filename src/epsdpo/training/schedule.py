"""The learning-rate schedule: a linear warm-up whose first step already learns, then cosine/linear/constant.

Hugging Face's schedulers warm up as ``lr · s / w`` for steps ``s = 0 … w−1``, so the first optimizer step runs at
learning rate 0 and changes nothing (with LoRA the adapter is still zero after it: one step of a short run wasted).
Here step ``s`` (0-based) of a warm-up of ``w`` steps runs at ``lr · (s + 1) / (w + 1)``: every step moves the
model, the ramp is still linear, and the first step after the warm-up is the first at the full rate. After the
warm-up, over the remaining ``n = total − w`` steps, with ``p = (s − w) / n``:

- ``cosine``: ``lr · ½ (1 + cos(π p))``; ``linear``: ``lr · (1 − p)``; ``constant``/``constant_with_warmup``: ``lr``.

The last step (``p = (n − 1)/n``) therefore still has a positive rate.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from epsdpo.training.config import SchedulerName

__all__ = ["KINDS", "lr_factor", "make_scheduler", "warmup_steps"]

#: the schedules ``lr_scheduler_type`` names (one source: the config's ``SchedulerName``)
KINDS: tuple[str, ...] = get_args(SchedulerName)


def warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """The warm-up length: ``warmup_steps`` when positive, else ``ceil(warmup_ratio · total_steps)``."""
    return warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """The multiplier of the base learning rate at 0-based optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use one of {', '.join(KINDS)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor` (its state_dict is its step count: resume-exact)."""
    if kind not in KINDS:  # fail here, not at the first step
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; use one of {', '.join(KINDS)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))
