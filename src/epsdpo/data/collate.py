"""Batching preference pairs: one padded batch holds the chosen and the rejected row of every pair.

Batch layout for B pairs (2B rows, right-padded to length T):

- rows ``0 .. B-1`` are ``prompt_ids + chosen_ids`` of pairs ``0 .. B-1``; rows ``B .. 2B-1`` are
  ``prompt_ids + rejected_ids`` of the same pairs, in the same order;
- ``input_ids`` (2B, T) long, ``pad_token_id`` after each row's end;
- ``attention_mask``, ``prompt_mask``, ``completion_mask`` (2B, T) long: 1 on the row's tokens, on its prompt
  tokens, on its completion tokens (``prompt_mask + completion_mask == attention_mask``);
- ``score_chosen``, ``score_rejected`` (B,) float32, NaN where the data had no score;
- ``index`` (B,) long: each pair's row in its source.

A model's logits at position t predict the token at t + 1; :func:`shift_for_logps` gives the labels and mask that
line up with ``logits[:, :-1]``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from epsdpo.data.tokenize import TokenizedPair

__all__ = ["PreferenceCollator", "batch_indices", "shift_for_logps"]


def shift_for_logps(input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and mask aligned with ``logits[:, :-1]``: ``(input_ids[:, 1:], completion_mask[:, 1:])``.

    ``logits[:, t]`` is the model's distribution for token ``t + 1``, so ``logits[:, :-1]`` scores
    ``labels = input_ids[:, 1:]`` and ``mask = completion_mask[:, 1:]`` is 1 exactly where that label is a
    completion token. Both outputs are (N, T-1). The first completion token is scored by the last prompt position,
    which is why every prompt keeps at least one token.
    """
    return input_ids[:, 1:], completion_mask[:, 1:]


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return int(math.ceil(length / multiple) * multiple)


@dataclass(frozen=True)
class PreferenceCollator:
    """Turns a list of :class:`TokenizedPair` into the batch described in the module docstring.

    Attributes:
        pad_token_id: the id written after each row's end (masked out everywhere).
        pad_to_multiple_of: pad T up to a multiple of this.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        width = _round_up(max(len(a) + len(b) for a, b in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (2B, T)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            n_prompt, n_total = len(prompt), len(prompt) + len(completion)
            input_ids[r, :n_total] = torch.tensor([*prompt, *completion], dtype=torch.long)
            prompt_mask[r, :n_prompt] = 1
            completion_mask[r, n_prompt:n_total] = 1

        def scores(values: list[float | None]) -> Tensor:
            return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)

        return {
            "input_ids": input_ids,
            "attention_mask": prompt_mask + completion_mask,
            "prompt_mask": prompt_mask,
            "completion_mask": completion_mask,
            "score_chosen": scores([p.score_chosen for p in pairs]),
            "score_rejected": scores([p.score_rejected for p in pairs]),
            "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        }


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool = True,
    group_by_length: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """Split ``range(len(lengths))`` into batches of ``batch_size`` indices.

    With ``group_by_length`` the (shuffled) indices are cut into mega-batches of ``mega_batch_factor`` batches,
    each sorted by length, so a batch holds pairs of similar length (less padding) while the data order stays
    random at the scale of mega-batches; the batch holding the longest pair goes first, so an out-of-memory
    error shows at the first step rather than hours in. Every index appears exactly once (unless ``drop_last``
    drops the last, short batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * mega_batch_factor
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        if shuffle:
            rng.shuffle(batches)
        batches.insert(0, first)
    return batches
