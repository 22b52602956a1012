"""Property tests: the boundary, BOS/EOS and mask invariants hold for random (unicode, whitespace-heavy) text.

Two real tokenizers: SmolLM2 (no BOS added; chat template with ``<|im_end|>``) and a byte-level BPE that adds
``<s>`` like Llama and whose chat template writes ``{{ bos_token }}`` itself (the classic double-BOS trap).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epsdpo.data import DataConfig, DataError, PreferenceCollator, TokenizedPair, load_preference_dataset

SPECIALS = (
    "<|",
    "|>",
    "<s>",
    "</s>",
    "<pad>",
    "<repo_name>",
    "<reponame>",
    "<file",
    "<gh_",
    "<issue",
    "<jupyter",
    "<empty_output>",
    "<filename>",
)
WHITESPACE = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\x0b"])
# SmolLM2's byte-level vocabulary lacks the symbols of a few bytes that its training text never held (some C0
# controls and the UTF-8 lead bytes 0xF1/0xF2 of the unassigned planes 4-11), so such text cannot decode back to
# itself: draw from planes 0-3 without C0/C1 controls (tab, newline and CR come from WHITESPACE).
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), max_codepoint=0x3FFFF)
RAW_TEXT = st.lists(
    st.one_of(st.text(CHARS, max_size=10), WHITESPACE, st.sampled_from(["é", "😀", "ß", "中文"])), max_size=6
).map("".join)
TEXT = RAW_TEXT.filter(lambda s: bool(s.strip()) and not any(x in s for x in SPECIALS))
# (the function-scoped fixture only picks a session-scoped, stateless tokenizer)
PROPS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
SYSTEM_TEXT = RAW_TEXT.filter(lambda s: not any(x in s for x in SPECIALS))


@st.composite
def standard_rows(draw: st.DrawFn) -> list[dict[str, str]]:
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = draw(TEXT)
        rows.append({"prompt": draw(TEXT), "chosen": chosen, "rejected": draw(TEXT.filter(lambda s, c=chosen: s != c))})
    return rows


@st.composite
def conversational_rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        turns = draw(st.integers(1, 2))
        prompt = []
        if draw(st.booleans()):
            prompt.append({"role": "system", "content": draw(SYSTEM_TEXT)})  # may be empty
        for t in range(turns):
            prompt.append({"role": "user", "content": draw(TEXT)})
            if t < turns - 1:
                prompt.append({"role": "assistant", "content": draw(TEXT)})
        chosen = draw(TEXT)
        rejected = draw(TEXT.filter(lambda s, c=chosen: s != c))
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _check_common(tokenizer: Any, pairs: list[TokenizedPair], adds_bos: bool) -> None:
    """BOS once at the start (when wanted), one EOS at each completion's end, masks exactly on the completion."""
    bos, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    for pair in pairs:
        assert pair.prompt_ids, "the first completion token needs a prompt token to be scored from"
        if adds_bos:
            assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
        assert pair.prompt_ids[:2] != [bos, bos]
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert ids[-1] == end and end not in ids[:-1]
    batch = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(pairs)
    n = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * n and batch["input_ids"].shape[1] % 8 == 0
    assert torch.equal(batch["attention_mask"], batch["prompt_mask"] + batch["completion_mask"])
    for i, pair in enumerate(pairs):
        start = len(pair.prompt_ids)
        for row, completion in ((i, pair.chosen_ids), (n + i, pair.rejected_ids)):
            positions = batch["completion_mask"][row].nonzero().flatten().tolist()
            assert positions == list(range(start, start + len(completion)))
            assert batch["input_ids"][row, :start].tolist() == pair.prompt_ids  # same prompt ids in both rows
            assert batch["input_ids"][row, positions].tolist() == completion
            assert batch["prompt_mask"][row].sum() == start


@pytest.fixture(params=["smollm2", "bos"])
def tokenizer_case(request: pytest.FixtureRequest) -> tuple[Any, bool]:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer"), False
    return request.getfixturevalue("bos_tokenizer"), True


@PROPS
@given(rows=standard_rows())
def test_standard_boundary_and_masks(tokenizer_case: tuple[Any, bool], rows: list[dict[str, str]]) -> None:
    tokenizer, adds_bos = tokenizer_case
    pairs, report = load_preference_dataset(rows, tokenizer, config=DataConfig(max_length=10_000))
    assert report.kept == len(rows) and not report.truncated
    _check_common(tokenizer, pairs, adds_bos)
    prefix = tokenizer.bos_token if adds_bos else ""
    for pair, row in zip(pairs, rows, strict=True):
        assert _decode(tokenizer, pair.prompt_ids) == prefix + row["prompt"]
        for key in ("chosen", "rejected"):
            full = _decode(tokenizer, pair.prompt_ids + getattr(pair, f"{key}_ids"))
            assert full == prefix + row["prompt"] + row[key] + tokenizer.eos_token


@PROPS
@given(rows=conversational_rows())
def test_conversational_boundary_and_masks(tokenizer_case: tuple[Any, bool], rows: list[dict[str, Any]]) -> None:
    tokenizer, adds_bos = tokenizer_case
    pairs, report = load_preference_dataset(rows, tokenizer, config=DataConfig(max_length=10_000))
    assert report.kept == len(rows)
    _check_common(tokenizer, pairs, adds_bos)
    for pair, row in zip(pairs, rows, strict=True):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert _decode(tokenizer, pair.prompt_ids) == prompt
        for key in ("chosen", "rejected"):
            rendered = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            # the completion stops at the end-of-turn token; the template's trailing newline is not trained on
            assert rendered.endswith(tokenizer.eos_token + "\n")
            assert _decode(tokenizer, pair.prompt_ids + getattr(pair, f"{key}_ids")) == rendered[:-1]


@PROPS
@given(
    rows=standard_rows(),
    max_length=st.integers(2, 40),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 30)),
    max_completion_length=st.one_of(st.none(), st.integers(1, 20)),
    mode=st.sampled_from(["keep_end", "keep_start"]),
)
def test_truncation_respects_limits(
    tokenizer_case: tuple[Any, bool],
    rows: list[dict[str, str]],
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    mode: str,
) -> None:
    tokenizer, adds_bos = tokenizer_case
    full, _ = load_preference_dataset(rows, tokenizer, config=DataConfig(max_length=10_000, max_prompt_length=None))
    config = DataConfig(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        truncation_mode=mode,
        on_invalid="skip",
    )
    try:
        pairs, report = load_preference_dataset(rows, tokenizer, config=config)
    except DataError as err:  # every pair dropped, for the counted truncation reasons only
        assert err.reason == "no_pairs" and "after_truncation" in str(err)
        return
    assert report.rows == report.kept + report.n_dropped == len(rows)
    assert set(report.dropped) <= {"empty_after_truncation", "identical_after_truncation"}
    by_index = {p.index: p for p in full}
    for pair in pairs:
        whole = by_index[pair.index]
        if max_prompt_length is not None:
            assert len(pair.prompt_ids) <= max_prompt_length
        if len(pair.prompt_ids) < len(whole.prompt_ids):
            if mode == "keep_start":
                assert whole.prompt_ids[: len(pair.prompt_ids)] == pair.prompt_ids
            elif adds_bos:  # keep_end keeps the BOS in front of the prompt's end
                assert pair.prompt_ids[0] == tokenizer.bos_token_id
                assert whole.prompt_ids[len(whole.prompt_ids) - len(pair.prompt_ids) + 1 :] == pair.prompt_ids[1:]
            else:
                assert whole.prompt_ids[len(whole.prompt_ids) - len(pair.prompt_ids) :] == pair.prompt_ids
        else:
            assert pair.prompt_ids == whole.prompt_ids
        for key in ("chosen", "rejected"):
            ids, whole_ids = getattr(pair, f"{key}_ids"), getattr(whole, f"{key}_ids")
            assert 0 < len(ids) and len(pair.prompt_ids) + len(ids) <= max_length
            assert max_completion_length is None or len(ids) <= max_completion_length
            assert whole_ids[: len(ids)] == ids
            assert getattr(pair, f"{key}_truncated") == (len(ids) < len(whole_ids))
            if not getattr(pair, f"{key}_truncated"):
                assert ids[-1] == tokenizer.eos_token_id
        assert pair.chosen_ids != pair.rejected_ids
    truncated_rows = sum(p.chosen_truncated for p in pairs)
    assert report.truncated.get("chosen_truncated", 0) == truncated_rows


def test_template_bos_is_not_doubled(bos_tokenizer: Any) -> None:
    """The template writes ``<s>`` and the tokenizer adds ``<s>``: the prompt still starts with exactly one."""
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}]
    pairs, report = load_preference_dataset(rows, bos_tokenizer)
    assert pairs[0].prompt_ids.count(bos_tokenizer.bos_token_id) == 1 and not report.truncated
    pretemplated = [{"prompt": "<s>[user]: hi\n[assistant]: ", "chosen": "yes", "rejected": "no"}]
    pairs, report = load_preference_dataset(pretemplated, bos_tokenizer)
    assert pairs[0].prompt_ids.count(bos_tokenizer.bos_token_id) == 1 and not report.truncated
    doubled = [{"prompt": "<s><s>x", "chosen": "yes", "rejected": "no"}]
    pairs, report = load_preference_dataset(doubled, bos_tokenizer)
    assert pairs[0].prompt_ids[:2] == [bos_tokenizer.bos_token_id, bos_tokenizer.convert_tokens_to_ids("x")]
    assert report.truncated == {"duplicate_bos_removed": 1}


def test_completion_already_ending_with_eos_gets_no_second(bos_tokenizer: Any) -> None:
    rows = [{"prompt": "q", "chosen": "yes</s>", "rejected": "no"}]
    pairs, _ = load_preference_dataset(rows, bos_tokenizer)
    assert pairs[0].chosen_ids.count(bos_tokenizer.eos_token_id) == 1
