"""Scoring given sequences: the summed log-probability of each completion under a model, in batches.

What evaluation, the reference's part of an evaluation and the experiments use to score sampled responses and
held-out pairs: the final hidden states and the linear head, a chunk of completion positions at a time
(:func:`epsdpo.logps.heads.completion_logps`), each chunk's log-softmax by training's one-pass vocabulary kernel
(:func:`epsdpo.logps.vocab.label_logps`, ``kernel="auto"``, with its eager fallback), as in training.

A model's log-probs of its own samples are not scored here when the sampler drew from π itself: the sampler keeps
them (:func:`epsdpo.sampling.sample_completions` ``with_logps``). Held-out pairs scored once, by the trainer's
end-of-training held-out pass, travel to the evaluation as :class:`PairScores`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from epsdpo.data import shift_for_logps
from epsdpo.logps.heads import completion_logps, fused_head_matches

__all__ = ["PairScores", "autocast", "pair_rows", "pairs_key", "row_logps", "sequence_logps"]


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
    kernel: str = "auto",
) -> torch.Tensor:
    """Summed log π(completion | prompt) under ``model`` of each ``(prompt_ids, completion_ids)`` row, (N,) float32.

    ``desc``: a progress bar with this label (unless ``disable_tqdm``). ``kernel``: the vocabulary kernel
    (:mod:`epsdpo.logps.vocab`; ``eager`` is the oracle).

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
            out.append(completion_logps(model, ids, attention, labels, mask, fused=fused, kernel=kernel).cpu())
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


def pairs_key(pairs: Sequence[Any]) -> str:
    """A key over the token ids of held-out pairs (:class:`TokenizedPair`), in order: two lists of pairs with the same
    key are the same rows to score."""
    digest = hashlib.sha256(b"held-out pairs")
    for p in pairs:
        digest.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class PairScores:
    """Held-out pairs scored once: the summed log-probs of their rows (chosen rows 0..P−1, then rejected rows
    P..2P−1, as :func:`pair_rows`) under the policy and the reference, with what decides whether another computation
    may use them instead of scoring the same rows again.

    The trainer's end-of-training held-out pass produces them (:attr:`epsdpo.training.loop.TrainResult.held_out`);
    the run's evaluation reads its held-out preference accuracy and reward margin from them when its pairs, its
    precision and (for the reference's figures) its reference are these.

    Attributes:
        key: :func:`pairs_key` of the pairs scored.
        policy: (2P,) log π of the rows.
        reference: (2P,) log π_ref of the rows, or None (a reference-free loss trained without one, or a reference
            that moved during training, TR-DPO).
        reference_id: what determines the reference's weights (:func:`epsdpo.models.reference_identity`), or None.
        bf16: whether they were computed under bfloat16 autocast.
    """

    key: str
    policy: list[float]
    reference: list[float] | None
    reference_id: str | None
    bf16: bool

    def __post_init__(self) -> None:
        if self.reference is not None and len(self.reference) != len(self.policy):
            raise ValueError(f"{len(self.policy)} policy rows but {len(self.reference)} reference rows")
