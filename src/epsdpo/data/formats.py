"""Format detection and per-row checks: every accepted row shape becomes one :class:`Example`.

Accepted shapes (per row; the report counts how many rows had each):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` are strings; tokenized as they are (no chat template).
- ``conversational``: at least one of them is a list of ``{"role", "content"}`` messages; rendered with the
  tokenizer's chat template. In such a row a string prompt is read as one user message and a string response as one
  assistant message.
- ``implicit_prompt``: ``chosen`` and ``rejected`` are whole conversations that share every message but their last
  (an assistant message); the shared messages are the prompt. A ``prompt`` column may be present too: it must then
  equal the shared messages, or the content of the last of them.

Scores (optional): ``score_chosen``/``score_rejected`` numbers, or one ``scores`` column (``scores_column``) holding
``[chosen, rejected]``, ``{"chosen": …, "rejected": …}``, or the scores of all k ≥ 3 responses sampled for the prompt
(as ``epsdpo generate`` writes them). The explicit margin of data selection is score_chosen − score_rejected, or, from
k scores, their max − min (Huang et al. 2025 score every sampled response and take the spread); with k scores the
chosen and rejected ones are not known, so ``score_chosen``/``score_rejected`` stay empty.

Completion ends (optional): boolean ``chosen_finished``/``rejected_finished`` columns, as ``epsdpo generate`` writes
them. ``false`` says the response was cut at a generation limit rather than ended by the model, so it must not be
given an end token (training on one would teach the model to stop wherever sampling was cut). Absent: finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from epsdpo.data.config import DataConfig
from epsdpo.data.errors import WHOLE_ROW, DataError, RowProblem
from epsdpo.data.loading import RawRows

__all__ = ["Columns", "Example", "Message", "resolve_columns", "normalize_row"]

Message = dict[str, Any]
Format = Literal["standard", "conversational", "implicit_prompt"]


@dataclass(frozen=True)
class Example:
    """One valid preference pair before tokenization.

    ``chosen``/``rejected`` are the completions only: a string (standard) or a one-message list (conversational).
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    format: Format
    score_chosen: float | None = None
    score_rejected: float | None = None
    chosen_finished: bool = True
    rejected_finished: bool = True
    score_margin: float | None = None  # max − min of several scores (a k-score ``scores`` column)

    @property
    def is_conversational(self) -> bool:
        return self.format != "standard"


@dataclass(frozen=True)
class Columns:
    """The columns to read, resolved against the columns the source has."""

    prompt: str
    chosen: str
    rejected: str
    has_prompt: bool
    score_chosen: str | None = None
    score_rejected: str | None = None
    scores: str | None = None
    finished: bool = False


FINISHED_COLUMNS = ("chosen_finished", "rejected_finished")


def resolve_columns(raw: RawRows, config: DataConfig) -> Columns:
    """Check the source has the columns the config names; raises :class:`DataError` listing the columns present."""
    present = set(raw.columns)

    def missing(column: str, option: str) -> DataError:
        shown = ", ".join(raw.columns) if raw.columns else "none"
        return DataError(
            f"{raw.source}: missing column {column!r} (columns present: {shown}). Rename the column in the data, "
            f"or point {option}=NAME at the column that holds it.",
            source=raw.source,
            reason="missing_column",
            column=column,
        )

    if not raw.rows:
        raise DataError(
            f"{raw.source}: no rows; give a dataset with at least one pair.", source=raw.source, reason="empty_dataset"
        )
    for column, option in ((config.chosen_column, "chosen_column"), (config.rejected_column, "rejected_column")):
        if column not in present:
            raise missing(column, option)
    has_prompt = config.prompt_column in present
    if not has_prompt and config.prompt_column != "prompt":
        raise missing(config.prompt_column, "prompt_column")
    score_chosen, score_rejected = config.score_chosen_column, config.score_rejected_column
    if score_chosen is None and config.scores_column is None:
        auto = [c for c in ("score_chosen", "score_rejected") if c in present]
        if len(auto) == 1:
            other = ({"score_chosen", "score_rejected"} - set(auto)).pop()
            raise missing(other, f"{other}_column")
        if auto:
            score_chosen, score_rejected = "score_chosen", "score_rejected"
    for column, option in (
        (score_chosen, "score_chosen_column"),
        (score_rejected, "score_rejected_column"),
        (config.scores_column, "scores_column"),
    ):
        if column is not None and column not in present:
            raise missing(column, option)
    finished = [c for c in FINISHED_COLUMNS if c in present]
    if len(finished) == 1:
        other = (set(FINISHED_COLUMNS) - set(finished)).pop()
        raise DataError(
            f"{raw.source}: column {finished[0]!r} is present but {other!r} is not; give both (true when the "
            f"response ended on its own, false when generation cut it), or neither.",
            source=raw.source,
            reason="missing_column",
            column=other,
        )
    return Columns(
        prompt=config.prompt_column,
        chosen=config.chosen_column,
        rejected=config.rejected_column,
        has_prompt=has_prompt,
        score_chosen=score_chosen,
        score_rejected=score_rejected,
        scores=config.scores_column,
        finished=bool(finished),
    )


def _value(row: Mapping[str, Any], column: str) -> Any:
    value = row.get(column)
    if value is None:
        raise RowProblem(
            "missing_value", column, "no value (the key is absent or null)", "Give every row a value in this column."
        )
    return value


def _text(value: Any, column: str, completion: bool) -> str:
    if not isinstance(value, str):
        raise RowProblem(
            "wrong_type",
            column,
            f"expected a string or a list of messages, got {type(value).__name__}",
            'Store text as a JSON string, or a conversation as a list of {"role", "content"} objects.',
        )
    if not value.strip():
        what = "response" if completion else "prompt"
        raise RowProblem(
            "empty_text",
            column,
            f"the {what} is empty or only whitespace",
            f"Give a non-empty {what}, or remove the row.",
        )
    return value


def _messages(value: Any, column: str) -> list[Message]:
    """Check a list of messages; each needs a non-empty string ``role`` and a string ``content``."""
    if not isinstance(value, list):
        raise RowProblem(
            "wrong_type",
            column,
            f"expected a list of messages, got {type(value).__name__}",
            'Give a conversation as a list of {"role", "content"} objects.',
        )
    if not value:
        raise RowProblem(
            "malformed_messages",
            column,
            "the list of messages is empty",
            'Give at least one {"role", "content"} message.',
        )
    for i, message in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(message, Mapping):
            raise RowProblem(
                "malformed_messages",
                where,
                f"a message must be an object, got {type(message).__name__}",
                'Write each message as {"role": ..., "content": ...}.',
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise RowProblem(
                "malformed_messages",
                f"{where}.role",
                f"role must be a non-empty string, got {role!r}",
                'Give each message a role such as "system", "user" or "assistant".',
            )
        if not isinstance(content, str):
            raise RowProblem(
                "malformed_messages",
                f"{where}.content",
                f"content must be a string, got {type(content).__name__}",
                "Give each message its text as a string (multimodal content lists are not supported).",
            )
    return [dict(m) for m in value]


def _as_messages(value: Any, column: str, role: str, completion: bool) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, column, completion)}]
    return _messages(value, column)


def _check_completion(messages: list[Message], column: str) -> None:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowProblem(
            "malformed_messages",
            f"{column}[{len(messages) - 1}].role",
            f"the response must be an assistant message, got role {last['role']!r}",
            "End each conversation with the assistant's answer.",
        )
    if not last["content"].strip():
        raise RowProblem(
            "empty_text",
            f"{column}[{len(messages) - 1}].content",
            "the response is empty or only whitespace",
            "Give a non-empty response, or remove the row.",
        )


def _conversational(
    row: Mapping[str, Any], columns: Columns
) -> tuple[list[Message], list[Message], list[Message], Format]:
    chosen = _as_messages(_value(row, columns.chosen), columns.chosen, "assistant", True)
    rejected = _as_messages(_value(row, columns.rejected), columns.rejected, "assistant", True)
    _check_completion(chosen, columns.chosen)
    _check_completion(rejected, columns.rejected)
    prompt_value = row.get(columns.prompt) if columns.has_prompt else None
    if len(chosen) == 1 and len(rejected) == 1:
        if prompt_value is None:
            raise RowProblem(
                "missing_value",
                columns.prompt,
                "no prompt, and chosen/rejected hold only the response",
                "Give a prompt, or store whole conversations in chosen and rejected.",
            )
        prompt = _as_messages(prompt_value, columns.prompt, "user", False)
        return prompt, chosen, rejected, "conversational"
    shared = chosen[:-1]
    if shared != rejected[:-1] or not shared:
        raise RowProblem(
            "no_shared_prompt",
            columns.rejected,
            "chosen and rejected do not share the conversation before their last message",
            "Make both conversations identical up to the final assistant message, or give the prompt "
            "in its own column and only the responses in chosen/rejected.",
        )
    if prompt_value is not None and prompt_value != shared and prompt_value != shared[-1]["content"]:
        raise RowProblem(
            "prompt_mismatch",
            columns.prompt,
            "the prompt differs from the conversation that chosen and rejected share",
            "Remove the prompt column (the shared messages are used), or make it match them.",
        )
    return shared, chosen[-1:], rejected[-1:], "implicit_prompt"


def _score(value: Any, column: str, from_csv: bool) -> float:
    if from_csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowProblem(
            "bad_score",
            column,
            f"a score must be a number, got {value!r}",
            "Give each score as a number (int or float).",
        )
    if not math.isfinite(value):
        raise RowProblem("bad_score", column, f"the score is {value}", "Give a finite score, or remove the row.")
    return float(value)


def _scores(
    row: Mapping[str, Any], columns: Columns, from_csv: bool
) -> tuple[float | None, float | None, float | None]:
    """(score_chosen, score_rejected, score_margin): a pair of scores, or k ≥ 3 scores' max − min as the margin."""
    if columns.score_chosen is not None and columns.score_rejected is not None:
        return (
            _score(_value(row, columns.score_chosen), columns.score_chosen, from_csv),
            _score(_value(row, columns.score_rejected), columns.score_rejected, from_csv),
            None,
        )
    if columns.scores is None:
        return None, None, None
    value = _value(row, columns.scores)
    if isinstance(value, Mapping) and set(value) == {"chosen", "rejected"}:
        value = [value["chosen"], value["rejected"]]
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise RowProblem(
            "bad_score",
            columns.scores,
            f"expected [chosen, rejected] scores or the scores of all responses, got {value!r}",
            'Give two scores, as [chosen, rejected] or {"chosen": x, "rejected": y}, or a list of every sampled '
            "response's score (k >= 3).",
        )
    scores = [_score(v, f"{columns.scores}[{i}]", from_csv) for i, v in enumerate(value)]
    if len(scores) == 2:
        return scores[0], scores[1], None
    return None, None, max(scores) - min(scores)


def _flag(value: Any, column: str, from_csv: bool) -> bool:
    if from_csv and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise RowProblem(
            "bad_flag",
            column,
            f"expected true or false, got {value!r}",
            "Give true when the response ended on its own and false when generation cut it.",
        )
    return value


def normalize_row(row: Any, columns: Columns, from_csv: bool = False) -> Example:
    """Check one row and return it as an :class:`Example`; raises :class:`RowProblem` naming the column."""
    if not isinstance(row, Mapping):
        raise RowProblem(
            "wrong_type",
            WHOLE_ROW,
            f"a row must be an object, got {type(row).__name__}",
            "Write each row as an object with prompt/chosen/rejected keys.",
        )
    values = [row.get(c) for c in (columns.prompt, columns.chosen, columns.rejected)]
    if any(isinstance(v, list) for v in values):
        prompt, chosen, rejected, fmt = _conversational(row, columns)
        same = chosen[-1]["content"] == rejected[-1]["content"]
        example = Example(prompt, chosen, rejected, fmt)
    else:
        if not columns.has_prompt:
            raise RowProblem(
                "missing_value",
                columns.prompt,
                "string data needs a prompt column",
                "Add a prompt column, or give chosen/rejected as whole conversations (message lists).",
            )
        prompt_text = _text(_value(row, columns.prompt), columns.prompt, completion=False)
        chosen_text = _text(_value(row, columns.chosen), columns.chosen, completion=True)
        rejected_text = _text(_value(row, columns.rejected), columns.rejected, completion=True)
        same = chosen_text == rejected_text
        example = Example(prompt_text, chosen_text, rejected_text, "standard")
    if same:
        raise RowProblem(
            "identical_responses",
            columns.rejected,
            "the rejected response is identical to the chosen one",
            "Remove the row: a pair with two equal responses carries no preference.",
        )
    score_chosen, score_rejected, score_margin = _scores(row, columns, from_csv)
    ends = [_flag(_value(row, c), c, from_csv) for c in FINISHED_COLUMNS] if columns.finished else [True, True]
    return Example(
        example.prompt,
        example.chosen,
        example.rejected,
        example.format,
        score_chosen,
        score_rejected,
        *ends,
        score_margin=score_margin,
    )
