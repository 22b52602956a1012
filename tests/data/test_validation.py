"""Every kind of bad input gives its own error naming the file, row and column; ``skip`` counts every row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epsdpo.data import DataConfig, DataError, load_preference_dataset

GOOD = {"prompt": "Hello?", "chosen": "Hi there.", "rejected": "Go away."}
CONV_GOOD = {
    "prompt": [{"role": "user", "content": "Hello?"}],
    "chosen": [{"role": "assistant", "content": "Hi there."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(tokenizer: Any, tmp_path: Path, bad: Any, good: Any = GOOD, **config: Any) -> DataError:
    """Load two good rows then ``bad`` (row 2, line 3) and return the error raised."""
    path = _write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad])
    with pytest.raises(DataError) as caught:
        load_preference_dataset(path, tokenizer, config=DataConfig(**config))
    message = str(caught.value)
    assert message.startswith(f"{path}: row 2 (line 3)"), message
    assert caught.value.row == 2 and caught.value.source == str(path)
    assert "on_invalid=skip" in message
    return caught.value


BAD_ROWS = [
    pytest.param({"prompt": "Hello?", "rejected": "No."}, "missing_value", "chosen", "no value", id="missing"),
    pytest.param({**GOOD, "chosen": None}, "missing_value", "chosen", "no value", id="null"),
    pytest.param({**GOOD, "chosen": 42}, "wrong_type", "chosen", "got int", id="int-response"),
    pytest.param({**GOOD, "prompt": {"text": "x"}}, "wrong_type", "prompt", "got dict", id="dict-prompt"),
    pytest.param({**GOOD, "chosen": ""}, "empty_text", "chosen", "response is empty", id="empty"),
    pytest.param({**GOOD, "rejected": " \n\t\u3000"}, "empty_text", "rejected", "only whitespace", id="whitespace"),
    pytest.param({**GOOD, "prompt": ""}, "empty_text", "prompt", "prompt is empty", id="empty-prompt"),
    pytest.param({**GOOD, "rejected": "Hi there."}, "identical_responses", "rejected", "identical", id="identical"),
    pytest.param('{"prompt": "x", ', "malformed_json", None, "not valid JSON", id="bad-json"),
    pytest.param("[1, 2]", "wrong_type", None, "must be an object, got list", id="not-object"),
    pytest.param(
        {**GOOD, "score_chosen": "high", "score_rejected": 1},
        "bad_score",
        "score_chosen",
        "must be a number",
        id="score-type",
    ),
    pytest.param(
        {**GOOD, "score_chosen": float("nan"), "score_rejected": 1},
        "bad_score",
        "score_chosen",
        "the score is nan",
        id="score-nan",
    ),
    pytest.param(
        {**GOOD, "chosen": "Hi<|im_end|> there"}, "end_token_in_text", "chosen", "end token", id="eos-in-text"
    ),
]


@pytest.mark.parametrize(("bad", "reason", "column", "problem"), BAD_ROWS)
def test_standard_row_errors(
    smollm2_tokenizer: Any, tmp_path: Path, bad: Any, reason: str, column: str | None, problem: str
) -> None:
    good = {**GOOD, "score_chosen": 1.0, "score_rejected": 0.0} if reason == "bad_score" else GOOD
    err = _error(smollm2_tokenizer, tmp_path, bad, good)
    assert err.reason == reason and problem in str(err)
    if column is not None:
        assert err.column == column and f"column {column!r}" in str(err)


def _conv(**changes: Any) -> dict[str, Any]:
    return {**CONV_GOOD, **changes}


BAD_MESSAGES = [
    pytest.param(_conv(chosen=["hi"]), "malformed_messages", "chosen[0]", "must be an object", id="not-dict"),
    pytest.param(_conv(chosen=[{"content": "hi"}]), "malformed_messages", "chosen[0].role", "role", id="no-role"),
    pytest.param(
        _conv(prompt=[{"role": "user", "content": ["part"]}]),
        "malformed_messages",
        "prompt[0].content",
        "content must be a string",
        id="content-list",
    ),
    pytest.param(_conv(prompt=[]), "malformed_messages", "prompt", "list of messages is empty", id="empty-list"),
    pytest.param(
        _conv(chosen=[{"role": "user", "content": "hi"}]),
        "malformed_messages",
        "chosen[0].role",
        "must be an assistant message",
        id="not-assistant",
    ),
    pytest.param(
        _conv(rejected=[{"role": "assistant", "content": "  "}]),
        "empty_text",
        "rejected[0].content",
        "empty",
        id="empty-content",
    ),
    pytest.param(
        _conv(rejected=[{"role": "assistant", "content": "Hi there."}]),
        "identical_responses",
        "rejected",
        "identical",
        id="identical",
    ),
    pytest.param(
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}],
        },
        "no_shared_prompt",
        "rejected",
        "do not share",
        id="no-shared-prompt",
    ),
    pytest.param(
        {
            "prompt": "Other question",
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}],
        },
        "prompt_mismatch",
        "prompt",
        "prompt differs",
        id="prompt-mismatch",
    ),
    pytest.param(
        {"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
        "missing_value",
        "prompt",
        "no prompt",
        id="no-prompt-anywhere",
    ),
]


@pytest.mark.parametrize(("bad", "reason", "column", "problem"), BAD_MESSAGES)
def test_conversational_row_errors(
    smollm2_tokenizer: Any, tmp_path: Path, bad: Any, reason: str, column: str, problem: str
) -> None:
    err = _error(smollm2_tokenizer, tmp_path, bad, CONV_GOOD)
    assert (err.reason, err.column) == (reason, column) and problem in str(err)


def test_missing_column_lists_the_columns_present(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer_a": "a", "rejected": "b"}])
    with pytest.raises(DataError) as caught:
        load_preference_dataset(path, smollm2_tokenizer)
    message = str(caught.value)
    assert message.startswith(f"{path}: missing column 'chosen'")
    assert "columns present: question, answer_a, rejected" in message and "chosen_column=NAME" in message
    assert caught.value.reason == "missing_column" and caught.value.column == "chosen"


def test_missing_renamed_or_score_columns(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "score_chosen": 1}])
    with pytest.raises(DataError, match="missing column 'score_rejected'"):
        load_preference_dataset(path, smollm2_tokenizer)
    with pytest.raises(DataError, match="missing column 'question'.*prompt_column=NAME"):
        load_preference_dataset(path, smollm2_tokenizer, config=DataConfig(prompt_column="question"))
    with pytest.raises(DataError, match="missing column 'ratings'"):
        load_preference_dataset(path, smollm2_tokenizer, config=DataConfig(scores_column="ratings"))


def test_string_data_without_prompt_column(smollm2_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="<list>: row 0, column 'prompt': string data needs a prompt column"):
        load_preference_dataset([{"chosen": "a", "rejected": "b"}], smollm2_tokenizer)


def test_malformed_csv_row_names_its_line(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected\nq,a,b\n"multi\nline",a,b\nq,a\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv: row 2 \(line 5\): has a different number of fields"):
        load_preference_dataset(path, smollm2_tokenizer)


def test_conversational_data_needs_a_chat_template(smollm2_tokenizer: Any, bos_tokenizer: Any) -> None:
    tokenizer = bos_tokenizer.__class__(
        tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    with pytest.raises(DataError, match="row 0 is conversational .* has no chat template"):
        load_preference_dataset([CONV_GOOD], tokenizer)


def test_template_that_rewrites_the_prompt(bos_tokenizer: Any) -> None:
    """A template that renders the generation prompt differently from a finished turn cannot be split exactly."""
    tokenizer = bos_tokenizer.__class__(
        tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant (generating)>{% endif %}"
    )
    with pytest.raises(DataError) as caught:
        load_preference_dataset([CONV_GOOD], tokenizer)
    assert caught.value.reason == "template_mismatch" and "column 'chosen'" in str(caught.value)


def test_skip_counts_add_up_to_the_input(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    rows = [
        GOOD,
        {**GOOD, "chosen": ""},
        "not json",
        {**GOOD, "rejected": GOOD["chosen"]},
        {**GOOD, "chosen": 3},
        {"prompt": "p" * 4000, "chosen": "a", "rejected": "b"},
        GOOD,
        {"prompt": "x", "rejected": "y"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = DataConfig(on_invalid="skip", max_length=64, max_prompt_length=None)
    pairs, report = load_preference_dataset(path, smollm2_tokenizer, config=config, report_dir=tmp_path / "run")
    assert report.rows == len(rows) == report.kept + report.n_dropped
    assert report.kept == len(pairs) == 2 and [p.index for p in pairs] == [0, 6]
    assert report.dropped == {
        "empty_text": 1,
        "malformed_json": 1,
        "identical_responses": 1,
        "wrong_type": 1,
        "empty_after_truncation": 1,
        "missing_value": 1,
    }
    saved = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert saved["dropped_total"] == 6 and saved["rows"] == 8
    assert saved["messages"]["empty_text"][0].startswith(f"{path}: row 1 (line 2), column 'chosen'")


def test_nothing_left_is_an_error(smollm2_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="no usable pair left out of 1 rows"):
        load_preference_dataset([{**GOOD, "chosen": ""}], smollm2_tokenizer, config=DataConfig(on_invalid="skip"))
    with pytest.raises(DataError, match="no rows"):
        load_preference_dataset([], smollm2_tokenizer)


# ---- responses cut at generation (chosen_finished / rejected_finished) ---------------------------------------------
def test_unfinished_completions_get_no_end_token(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    eos, im_end = smollm2_tokenizer.eos_token_id, smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [
        {**GOOD, "chosen_finished": False, "rejected_finished": True},
        {**CONV_GOOD, "chosen_finished": True, "rejected_finished": False},
        {**GOOD, "chosen": "Hi there<|endoftext|>", "chosen_finished": False, "rejected_finished": False},
    ]
    (a, b, c), report = load_preference_dataset(rows, smollm2_tokenizer, warn=False)
    (plain,), _ = load_preference_dataset([GOOD], smollm2_tokenizer, warn=False)
    (chat,), _ = load_preference_dataset([CONV_GOOD], smollm2_tokenizer, warn=False)
    # the same ids as a finished completion, minus its end token, and only on the side marked unfinished
    assert a.chosen_ids == plain.chosen_ids[:-1] and a.rejected_ids == plain.rejected_ids
    assert plain.chosen_ids[-1] == eos and a.chosen_truncated and not a.rejected_truncated
    assert chat.rejected_ids[-1] == im_end and b.rejected_ids == chat.rejected_ids[:-1]
    assert b.chosen_ids == chat.chosen_ids and b.rejected_truncated and not b.chosen_truncated
    assert c.chosen_ids[-1] != eos and c.rejected_ids[-1] != eos  # a written end token is taken off too
    assert report.truncated == {"chosen_unfinished": 2, "rejected_unfinished": 2}


def test_finished_flags_are_checked(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    error = _error(
        smollm2_tokenizer,
        tmp_path,
        {**GOOD, "chosen_finished": "no", "rejected_finished": True},
        good={**GOOD, "chosen_finished": True, "rejected_finished": True},
    )
    assert error.reason == "bad_flag" and error.column == "chosen_finished" and "got 'no'" in str(error)
    with pytest.raises(DataError, match="'rejected_finished' is not; give both"):
        load_preference_dataset([{**GOOD, "chosen_finished": False}], smollm2_tokenizer)
    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected,chosen_finished,rejected_finished\nHello?,Hi.,Go.,false,TRUE\n")
    (pair,), _ = load_preference_dataset(csv, smollm2_tokenizer, warn=False)
    assert pair.chosen_truncated and not pair.rejected_truncated


def test_bundled_pairs_mark_their_cut_responses(smollm2_tokenizer: Any) -> None:
    pairs, report = load_preference_dataset("bundled:sentiment_pairs", smollm2_tokenizer, warn=False)
    assert report.truncated["chosen_unfinished"] + report.truncated["rejected_unfinished"] > len(pairs)
    ends = {p.chosen_ids[-1] for p in pairs if not p.chosen_truncated}
    assert ends == {smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_unfinished_completions_alone_do_not_warn(smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    row = {**GOOD, "chosen_finished": False, "rejected_finished": False}
    with caplog.at_level("WARNING", logger="epsdpo.data.pipeline"):
        load_preference_dataset([row], smollm2_tokenizer)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="epsdpo.data.pipeline"):
        load_preference_dataset([row], smollm2_tokenizer, config=DataConfig(max_length=4, max_prompt_length=2))
    assert "chosen_truncated" in caplog.text and "chosen_unfinished" in caplog.text
