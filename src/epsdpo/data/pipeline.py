"""``load_preference_dataset``: source → checked rows → rendered texts → token ids → truncated pairs, all counted.

Every row read ends up either kept or dropped with a reason: ``report.rows == report.kept + report.n_dropped``.
With ``on_invalid="error"`` (the default) the first invalid row raises :class:`DataError` naming the source, row
and column; with ``"skip"`` it is dropped and counted. Rows that repeat an earlier row's pair are counted (and
dropped under ``duplicates="drop"``); duplicates and a mix of plain and chat rows are reported as warnings.
Truncation never raises: a cut row is kept and counted, a pair that cannot be trained on after cutting is dropped
and counted. Whole-dataset problems (a missing column, an unreadable file, conversational data for a tokenizer
without a chat template, no usable pair left) always raise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from epsdpo.data.config import DataConfig
from epsdpo.data.errors import DataError, RowProblem
from epsdpo.data.formats import Example, normalize_row, resolve_columns
from epsdpo.data.loading import RawRows, load_rows
from epsdpo.data.report import REPORT_FILE, DataReport
from epsdpo.data.tokenize import (
    RenderedPair,
    TokenizedPair,
    TokenizedText,
    TokenizerSpec,
    Truncation,
    inspect_tokenizer,
    render_example,
    tokenize_rendered,
    truncate_pair,
)

__all__ = ["load_eval_dataset", "load_preference_dataset"]

logger = logging.getLogger(__name__)


class _Sink:
    """Sends each row problem to an error or to a counted drop, according to ``on_invalid``."""

    def __init__(self, raw: RawRows, report: DataReport, on_invalid: str) -> None:
        self.raw, self.report, self.on_invalid = raw, report, on_invalid

    def __call__(self, index: int, problem: RowProblem) -> None:
        where = self.raw.where(index)
        if self.on_invalid == "error":
            raise DataError.from_problem(problem, where)
        self.report.drop(problem.reason, problem.describe(where))


def _examples(raw: RawRows, config: DataConfig, sink: _Sink, report: DataReport) -> dict[int, Example]:
    columns = resolve_columns(raw, config)
    examples: dict[int, Example] = {}
    for index, row in enumerate(raw.rows):
        try:
            if index in raw.problems:
                raise raw.problems[index]
            examples[index] = normalize_row(row, columns, from_csv=raw.kind == "csv")
        except RowProblem as problem:
            sink(index, problem)
    for example in examples.values():
        report.formats[example.format] += 1
    plain = report.formats["standard"]
    chat = sum(n for f, n in report.formats.items() if f != "standard")
    if plain and chat:
        report.warnings.append(
            f"the data mixes {plain} plain-text rows with {chat} chat rows (lists of messages): the plain ones are "
            "tokenized as they are, the chat ones through the chat template, so training sees two prompt formats. "
            "Give every row in one format."
        )
    return _drop_or_count_duplicates(examples, raw, config, report)


def _drop_or_count_duplicates(
    examples: dict[int, Example], raw: RawRows, config: DataConfig, report: DataReport
) -> dict[int, Example]:
    """Rows that read as the same pair as an earlier row: counted, and dropped under ``duplicates=drop``."""
    first: dict[str, int] = {}
    kept: dict[int, Example] = {}
    for index, example in examples.items():
        key = json.dumps(asdict(example), sort_keys=True, ensure_ascii=False)
        earlier = first.setdefault(key, index)
        if earlier != index:
            report.duplicates += 1
            message = f"{raw.where(index)}: the same pair as row {earlier}"
            if config.duplicates == "drop":
                report.drop("duplicate", message)
                continue
            report.note("duplicate", message)
        kept[index] = example
    if report.duplicates:
        done = (
            "dropped (duplicates=drop)"
            if config.duplicates == "drop"
            else "kept, so each weighs more than once in training; set duplicates=drop to drop them"
        )
        report.warnings.append(
            f"{report.duplicates} rows repeat an earlier row's pair (e.g. {report.messages['duplicate'][0]}): {done}."
        )
    return kept


def _render(
    examples: dict[int, Example], tokenizer: Any, spec: TokenizerSpec, config: DataConfig, sink: _Sink
) -> dict[int, RenderedPair]:
    columns = (config.chosen_column, config.rejected_column)
    rendered: dict[int, RenderedPair] = {}
    for index, example in examples.items():
        if example.is_conversational and not spec.has_chat_template:
            raise DataError(
                f"{sink.raw.source}: row {index} is conversational (lists of messages) but tokenizer "
                f"{spec.name!r} has no chat template; use a chat model's tokenizer, or give the data as strings.",
                source=sink.raw.source,
                reason="no_chat_template",
                row=index,
            )
        try:
            rendered[index] = render_example(example, tokenizer, spec, columns)
        except RowProblem as problem:
            sink(index, problem)
    return rendered


def _pairs(
    examples: dict[int, Example],
    rendered: dict[int, RenderedPair],
    tokenizer: Any,
    spec: TokenizerSpec,
    config: DataConfig,
    sink: _Sink,
    report: DataReport,
) -> list[TokenizedPair]:
    indices = list(rendered)
    columns = (config.chosen_column, config.rejected_column)
    texts = tokenize_rendered(
        [rendered[i] for i in indices],
        [examples[i].is_conversational for i in indices],
        tokenizer,
        spec,
        columns,
        [(examples[i].chosen_finished, examples[i].rejected_finished) for i in indices],
    )
    limits = Truncation(
        config.max_length, config.max_prompt_length, config.max_completion_length, config.truncation_mode
    )
    keep_bos = spec.bos_id if spec.adds_bos else None
    pairs: list[TokenizedPair] = []
    for index, tokens in zip(indices, texts, strict=True):
        if isinstance(tokens, RowProblem):
            sink(index, tokens)
            continue
        pair = _truncate(index, tokens, examples[index], limits, keep_bos, sink, report)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _truncate(
    index: int,
    tokens: TokenizedText,
    example: Example,
    limits: Truncation,
    keep_bos: int | None,
    sink: _Sink,
    report: DataReport,
) -> TokenizedPair | None:
    where = str(sink.raw.where(index))
    for part, ids in (("prompt", tokens.prompt), ("chosen", tokens.chosen), ("rejected", tokens.rejected)):
        report.lengths[part].append(len(ids))
    prompt, chosen, rejected, reasons, drop = truncate_pair(
        tokens.prompt, tokens.chosen, tokens.rejected, limits, keep_bos
    )
    lengths = f"prompt {len(tokens.prompt)}, chosen {len(tokens.chosen)}, rejected {len(tokens.rejected)} tokens"
    if drop is not None:
        report.drop(
            drop,
            f"{where}: {drop.replace('_', ' ')} ({lengths}; max_length={limits.max_length}, "
            f"max_prompt_length={limits.max_prompt_length})",
        )
        return None
    if tokens.duplicate_bos:
        reasons.append("duplicate_bos_removed")
    unfinished = [
        name
        for name, done in (("chosen", example.chosen_finished), ("rejected", example.rejected_finished))
        if not done
    ]
    reasons += [f"{name}_unfinished" for name in unfinished]
    for reason in reasons:
        report.truncate(reason, f"{where}: {reason.replace('_', ' ')} ({lengths})")
    return TokenizedPair(
        prompt,
        chosen,
        rejected,
        example.score_chosen,
        example.score_rejected,
        index,
        chosen_truncated="chosen_truncated" in reasons or "chosen" in unfinished,
        rejected_truncated="rejected_truncated" in reasons or "rejected" in unfinished,
        score_margin=example.score_margin,
    )


def load_preference_dataset(
    source: DataConfig | Any,
    tokenizer: Any,
    *,
    config: DataConfig | None = None,
    split: str | None = None,
    report_dir: str | Path | None = None,
    report_name: str = REPORT_FILE,
    warn: bool = True,
) -> tuple[list[TokenizedPair], DataReport]:
    """Load, check, tokenize and truncate preference pairs the way training uses them.

    Args:
        source: a :class:`DataConfig` (its ``dataset`` is read), or directly a path / Hub id / ``datasets.Dataset``
            / list of dicts (then ``config`` gives the other settings, defaults otherwise).
        tokenizer: a Hugging Face tokenizer (see :func:`epsdpo.models.load_tokenizer`).
        config: settings when ``source`` is not a config.
        split: the split to read (default ``config.split``).
        report_dir: where to write the :class:`DataReport` as ``report_name`` (e.g. the run directory).
        warn: log the report's summary as a warning when rows were dropped or truncated.

    Returns:
        the kept pairs in source order, and the report (``rows == kept + dropped``).

    Raises:
        DataError: a whole-dataset problem, an invalid row under ``on_invalid="error"``, or no pair left.
    """
    if isinstance(source, DataConfig):
        config, source = source, source.dataset
        if source is None:
            raise DataError("no dataset given; set dataset=PATH_OR_HUB_ID.", source="<config>", reason="no_dataset")
    config = config or DataConfig()
    raw = load_rows(source, dataset_config=config.dataset_config, split=split or config.split)
    report = DataReport(source=raw.source, rows=len(raw.rows))
    sink = _Sink(raw, report, config.on_invalid)
    spec = inspect_tokenizer(tokenizer)
    examples = _examples(raw, config, sink, report)
    rendered = _render(examples, tokenizer, spec, config, sink)
    pairs = _pairs(examples, rendered, tokenizer, spec, config, sink, report)
    report.kept = len(pairs)
    if report.rows != report.kept + report.n_dropped:  # an internal bug, never the data's fault
        raise AssertionError(f"row accounting is off: {report.to_dict()}")
    if report_dir is not None:
        report.write(report_dir, report_name)
    # completions the data itself marks as cut at generation are information, not a problem: no warning for them
    if warn and (
        report.dropped or report.warnings or set(report.truncated) - {"chosen_unfinished", "rejected_unfinished"}
    ):
        logger.warning("%s", report.summary())
    if not pairs:
        raise DataError(
            f"{raw.source}: no usable pair left out of {report.rows} rows.\n{report.summary()}\nFix the data or "
            "the length limits (max_length, max_prompt_length).",
            source=raw.source,
            reason="no_pairs",
        )
    return pairs, report


def load_eval_dataset(
    config: DataConfig,
    tokenizer: Any,
    *,
    report_dir: str | Path | None = None,
) -> tuple[list[TokenizedPair], DataReport] | None:
    """The evaluation pairs: ``eval_dataset`` if set, else ``eval_split`` of ``dataset``; ``None`` if neither.

    The report is written as ``data_report_eval.json``.
    """
    if config.eval_dataset is not None:
        eval_config = replace(config, dataset=config.eval_dataset, split=config.eval_split or config.split)
    elif config.eval_split is not None:
        eval_config = replace(config, split=config.eval_split)
    else:
        return None
    return load_preference_dataset(eval_config, tokenizer, report_dir=report_dir, report_name="data_report_eval.json")
