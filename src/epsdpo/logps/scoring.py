"""Scoring given sequences: the summed log-probability of each completion under a model, in batches.

What evaluation, the reference's part of an evaluation and the experiments use to score sampled responses and
held-out pairs: the final hidden states and the linear head, a chunk of completion positions at a time
(:func:`epsdpo.logps.heads.completion_logps`), as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from epsdpo.data import shift_for_logps
from epsdpo.logps.heads import completion_logps, fused_head_matches

__all__ = ["autocast", "pair_rows", "row_logps", "sequence_logps"]


def autocast(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def row_logps(
    model: nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str | None = None,
    disable_tqdm: bool = True,
) -> torch.Tensor:
    """Summed log π(completion | prompt) under ``model`` of each ``(prompt_ids, completion_ids)`` row, (N,) float32.

    ``desc``: a progress bar with this label (unless ``disable_tqdm``).

    Rows are right-padded in batches of ``batch_size``; the log-probs come from the final hidden states and the
    linear head, a chunk of completion positions at a time (the model's full logits only where its logits are not its
    linear head's output), as in training.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    fused: bool | None = None
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, disable=disable_tqdm or desc is None, dynamic_ncols=True):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (N, T), right-padded
        completion = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (prompt, comp) in enumerate(chunk):
            ids[r, : len(prompt) + len(comp)] = torch.tensor([*prompt, *comp], dtype=torch.long)
            completion[r, len(prompt) : len(prompt) + len(comp)] = 1
            attention[r, : len(prompt) + len(comp)] = 1
        ids, completion, attention = ids.to(device), completion.to(device), attention.to(device)
        if fused is None:  # once: is head(final hidden state) exactly what the model returns as logits?
            fused = fused_head_matches(model, ids, attention)
        labels, mask = shift_for_logps(ids, completion)
        with autocast(model, bf16):
            out.append(completion_logps(model, ids, attention, labels, mask, fused=fused).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def sequence_logps(
    policy: nn.Module,
    reference: nn.Module,
    pairs: Sequence[Any],
    pad_id: int,
    *,
    batch_size: int = 8,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs under both models of every row of ``pairs`` (:class:`TokenizedPair`).

    Returns ``(policy, reference)``, each (2P,) float32: rows 0..P−1 for the ``chosen_ids``, P..2P−1 for the
    ``rejected_ids`` (see :func:`row_logps`).
    """
    rows = pair_rows(pairs)
    return (
        row_logps(policy, rows, pad_id, batch_size=batch_size, bf16=bf16),
        row_logps(reference, rows, pad_id, batch_size=batch_size, bf16=bf16),
    )


def pair_rows(pairs: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
