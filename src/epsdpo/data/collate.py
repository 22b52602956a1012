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

Prefix sharing (:meth:`PreferenceCollator.shared_prefix`, :class:`SharedPrefixBatch`): each pair is also laid out as
one row, ``prompt + chosen + rejected``, so the model runs over the prompt once. Its attention mask lets every token
see the prompt and the earlier tokens of its own response only (the rejected response never sees the chosen one),
and its positions restart after the prompt (the rejected response's first token has the position the chosen one's
has), so each response sees exactly what it sees in its own row above. The first token of either response is scored
by the last prompt position; ``source``/``target`` map each scoring position of the shared rows to its cell of the
(2B, T−1) grid of :func:`shift_for_logps`, so everything downstream of the hidden states is the unshared arithmetic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from epsdpo.data.tokenize import TokenizedPair

__all__ = ["PreferenceCollator", "SharedPrefixBatch", "batch_indices", "shift_for_logps"]


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


class SharedPrefixBatch(NamedTuple):
    """B pairs as B rows ``prompt + chosen + rejected`` (padded to length L), and where their scores go.

    Attributes:
        input_ids: (B, L) long, the pad id on padding.
        position_ids: (B, L) long: 0..P−1 on the prompt, P..P+C−1 on the chosen response, P..P+R−1 again on the
            rejected one (positions restart after the prompt), 0 on padding.
        allowed: (B, L, L) bool, ``allowed[b, q, k]``: query q may attend to key k: causal, the prompt visible to
            both responses, neither response visible to the other; a padding position sees itself only (so no
            softmax row is empty) and is seen by nobody.
        source: (M,) long, the M scoring positions, as indices into the flattened (B·L) shared rows.
        target: (M,) long, the cell of the flattened (2B·(T−1)) unshared grid each one fills: the grid of
            :func:`shift_for_logps` over the same pairs' unshared batch, in its row-major order. The last prompt
            position appears twice in ``source``: it scores the first token of both responses.
        grid: (2B, T−1), the unshared grid's shape.
        tokens: the tokens the model runs over (padding excluded).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    source: Tensor
    target: Tensor
    grid: tuple[int, int]
    tokens: int

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        """The same batch with its tensors on ``device``."""
        moved = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "allowed", "source", "target")}
        return self._replace(**moved)


_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, -1


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

    def shared_prefix(
        self, pairs: Sequence[TokenizedPair], width: int, padding_side: Literal["right", "left"] = "right"
    ) -> SharedPrefixBatch:
        """The pairs as shared-prefix rows (:class:`SharedPrefixBatch`); ``width`` is T, the width of the unshared
        batch ``self(pairs)`` whose shifted grid the scores fill. ``padding_side``: where the padding goes (the
        mask and positions make either exact; training uses the right)."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        b = len(pairs)
        sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        length = _round_up(max(sizes), self.pad_to_multiple_of)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)  # (B, L)
        position_ids = torch.zeros((b, length), dtype=torch.long)
        segment = torch.full((b, length), _PAD, dtype=torch.long)
        source: list[int] = []
        target: list[int] = []
        cells = width - 1  # the shifted grid's width
        for i, p in enumerate(pairs):
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            if n_p < 1:
                raise ValueError(f"pair from source row {p.index} has an empty prompt; every prompt keeps one token")
            off = 0 if padding_side == "right" else length - (n_p + n_c + n_r)
            row = slice(off, off + n_p + n_c + n_r)
            input_ids[i, row] = torch.tensor([*p.prompt_ids, *p.chosen_ids, *p.rejected_ids], dtype=torch.long)
            position_ids[i, row] = torch.cat(
                [torch.arange(n_p), torch.arange(n_p, n_p + n_c), torch.arange(n_p, n_p + n_r)]
            )
            segment[i, row] = torch.tensor([_PROMPT] * n_p + [_CHOSEN] * n_c + [_REJECTED] * n_r)
            last_prompt = i * length + off + n_p - 1
            # chosen token k (grid cell P−1+k of row i) is scored at shared position P−1+k
            for k in range(n_c):
                source.append(last_prompt + k)
                target.append(i * cells + n_p - 1 + k)
            # rejected token k (grid cell P−1+k of row B+i): the last prompt position, then its own positions
            for k in range(n_r):
                source.append(last_prompt if k == 0 else last_prompt + n_c + k)
                target.append((b + i) * cells + n_p - 1 + k)
        q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (B, L, 1), (B, 1, L)
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        real = (q != _PAD) & (k != _PAD)
        allowed = causal & real & ((k == _PROMPT) | (k == q))
        allowed |= torch.eye(length, dtype=torch.bool)  # padding sees itself: no empty softmax row
        order = torch.tensor(target, dtype=torch.long).argsort()  # the grid's row-major order
        return SharedPrefixBatch(
            input_ids,
            position_ids,
            allowed,
            torch.tensor(source, dtype=torch.long)[order],
            torch.tensor(target, dtype=torch.long)[order],
            (2 * b, cells),
            sum(sizes),
        )


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
