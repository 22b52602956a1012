from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo.data import (
    PreferenceCollator,
    TokenizedPair,
    Truncation,
    batch_indices,
    shift_for_logps,
    truncate_pair,
)


def _pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    index: int = 0,
    scores: tuple[float | None, float | None] = (None, None),
) -> TokenizedPair:
    return TokenizedPair(prompt, chosen, rejected, scores[0], scores[1], index)


def test_batch_layout_by_hand() -> None:
    pairs = [_pair([5, 6], [7, 2], [8, 9, 2], index=3, scores=(1.5, 0.5)), _pair([5], [4, 2], [2], index=7)]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 2, 0],  # chosen of pair 0
        [5, 4, 2, 0, 0],  # chosen of pair 1
        [5, 6, 8, 9, 2],  # rejected of pair 0
        [5, 2, 0, 0, 0],  # rejected of pair 1
    ]
    assert batch["prompt_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["index"].tolist() == [3, 7] and batch["index"].dtype == torch.long
    assert batch["score_chosen"][0] == 1.5 and math.isnan(batch["score_chosen"][1])
    assert batch["score_rejected"].dtype == torch.float32
    labels, mask = shift_for_logps(batch["input_ids"], batch["completion_mask"])
    # logits[:, t] predicts input_ids[:, t + 1]: the masked labels are exactly the completion tokens
    assert labels[mask.bool()].tolist() == [7, 2, 4, 2, 8, 9, 2, 2]
    assert labels.shape == mask.shape == (4, 4)


def test_pad_to_multiple_of_and_empty_batch() -> None:
    batch = PreferenceCollator(pad_token_id=9, pad_to_multiple_of=8)([_pair([1], [2], [3, 4])])
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][0, 2:].eq(9).all()
    with pytest.raises(ValueError, match="empty"):
        PreferenceCollator(0)([])


@settings(max_examples=100, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 50), min_size=1, max_size=30),
    chosen=st.lists(st.integers(3, 50), min_size=1, max_size=30),
    rejected=st.lists(st.integers(3, 50), min_size=1, max_size=30),
    max_length=st.integers(1, 70),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 40)),
    mode=st.sampled_from(["keep_end", "keep_start"]),
    bos=st.booleans(),
)
def test_truncate_pair_rules(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int | None,
    mode: str,
    bos: bool,
) -> None:
    if bos:
        prompt = [1, *prompt]
    p, c, r, reasons, drop = truncate_pair(
        prompt, chosen, rejected, Truncation(max_length, max_prompt_length, None, mode), 1 if bos else None
    )
    if max_prompt_length is not None:
        assert len(p) <= max_prompt_length
        assert ("prompt_truncated" in reasons) == (len(prompt) > max_prompt_length)
    if bos:
        assert p[0] == 1
    if mode == "keep_start":
        assert p == prompt[: len(p)]
    if mode == "keep_end" and len(p) < len(prompt):
        assert p[int(bos) :] == prompt[len(prompt) - len(p) + int(bos) :]
    assert c == chosen[: len(c)] and r == rejected[: len(r)]
    assert len(p) + len(c) <= max(max_length, len(p)) and len(p) + len(r) <= max(max_length, len(p))
    assert ("chosen_truncated" in reasons) == (len(c) < len(chosen))
    if drop == "empty_after_truncation":
        assert not c or not r
    elif drop == "identical_after_truncation":
        assert c == r
    else:
        assert drop is None and c and r and c != r


def test_truncation_example_like_trl() -> None:
    limits = Truncation(max_length=6, max_prompt_length=3, mode="keep_end")
    assert truncate_pair([1, 2, 3, 4, 5], [6, 7, 8, 9], [6, 10], limits)[:4] == (
        [3, 4, 5],
        [6, 7, 8],
        [6, 10],
        ["prompt_truncated", "chosen_truncated"],
    )
    assert truncate_pair([1, 2, 3, 4, 5], [6], [7], Truncation(6, 3, mode="keep_start"))[0] == [1, 2, 3]
    assert truncate_pair([1, 2, 3, 4, 5], [6], [7], Truncation(6, 3), bos_id=1)[0] == [1, 4, 5]
    assert truncate_pair([1, 2, 3], [6, 7], [6, 8], Truncation(4))[4] == "identical_after_truncation"
    assert truncate_pair([1, 2, 3, 4], [6, 7], [6, 8], Truncation(4))[4] == "empty_after_truncation"
    with pytest.raises(ValueError, match="truncation_mode"):
        truncate_pair([1], [2], [3], Truncation(4, mode="left"))


def test_batch_indices_cover_everything_once() -> None:
    lengths = [((i * 37) % 101) + 1 for i in range(103)]
    for group in (False, True):
        batches = batch_indices(lengths, 8, group_by_length=group, seed=3)
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert sorted(len(b) for b in batches) == [7] + [8] * 12
    plain = batch_indices(lengths, 8, shuffle=False)
    assert plain[0] == list(range(8))
    assert len(batch_indices(lengths, 8, drop_last=True)) == 12


def test_length_grouping_cuts_padding() -> None:
    lengths = [((i * 37) % 101) + 1 for i in range(400)]

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = batch_indices(lengths, 8, group_by_length=True, seed=0)
    assert padding(grouped) < padding(batch_indices(lengths, 8, seed=0)) / 4
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # the longest batch first: OOM shows at once
