"""Data hygiene: bytes that are not UTF-8 are named by line (and skipped under on_invalid=skip), a byte order mark
is dropped, a mix of plain and chat rows and duplicate rows are counted with a warning (duplicates: keep|drop)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epsdpo.config import ConfigError
from epsdpo.data import DataConfig, DataError, load_preference_dataset
from epsdpo.sampling import load_prompts
from epsdpo.training import load_run_config

FIXTURES = Path(__file__).parent / "fixtures"
BOM = b"\xef\xbb\xbf"
LATIN1 = "Café".encode("latin-1")  # b"Caf\xe9": not UTF-8


def _row(i: int) -> dict[str, Any]:
    return {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _fixture_rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def _ids(pairs: list[Any]) -> list[tuple[Any, ...]]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index) for p in pairs]


# ---- bytes that are not UTF-8 -------------------------------------------------------------------------------------
def test_a_jsonl_line_that_is_not_utf8_is_named_and_skipped_under_skip(tmp_path, bos_tokenizer):
    lines = _jsonl([_row(0), _row(1)]).splitlines(keepends=True)
    broken = b'{"prompt": "' + LATIN1 + b'", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / "data.jsonl"
    path.write_bytes(lines[0] + b"\n" + broken + lines[1])  # the broken row is on line 3 (line 2 is blank)
    with pytest.raises(DataError, match=r"data\.jsonl: row 1 \(line 3\): is not valid UTF-8 \(byte b'\\xe9' at col"):
        load_preference_dataset(path, bos_tokenizer)
    pairs, report = load_preference_dataset(path, bos_tokenizer, config=DataConfig(on_invalid="skip"))
    assert [p.index for p in pairs] == [0, 2] and report.rows == 3 and report.kept == 2
    assert report.dropped == {"invalid_utf8": 1}
    assert report.messages["invalid_utf8"][0].startswith(f"{path}: row 1 (line 3): is not valid UTF-8")


def test_a_csv_row_that_is_not_utf8_is_named_and_skipped_under_skip(tmp_path, bos_tokenizer):
    path = tmp_path / "data.csv"
    path.write_bytes(b'prompt,chosen,rejected\nQ0?,Good.,Bad.\n"Q1\nspans two lines",' + LATIN1 + b",x\nQ2?,Yes.,No.\n")
    with pytest.raises(DataError, match=r"data\.csv: row 1 \(line 3\): is not valid UTF-8 \(byte b'\\xe9'\)"):
        load_preference_dataset(path, bos_tokenizer)
    pairs, report = load_preference_dataset(path, bos_tokenizer, config=DataConfig(on_invalid="skip"))
    assert [p.index for p in pairs] == [0, 2] and report.dropped == {"invalid_utf8": 1}


def test_a_json_file_that_is_not_utf8_names_the_line(tmp_path, bos_tokenizer):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "' + LATIN1 + b'"}\n]')
    with pytest.raises(DataError, match=r"data\.json, line 3: not valid UTF-8 \(byte b'\\xe9'\)"):
        load_preference_dataset(path, bos_tokenizer)


def test_a_prompts_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "' + LATIN1 + b'"}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 1 \(line 2\): is not valid UTF-8"):
        load_prompts(str(path))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken=st.sets(st.integers(0, 7), max_size=7), bom=st.booleans())
def test_property_exactly_the_broken_lines_are_dropped(tmp_path_factory, bos_tokenizer, broken, bom):
    rows = [_row(i) for i in range(8)]
    lines = [json.dumps(r).encode() for r in rows]
    lines = [line.replace(b"Bad", b"B\xffd") if i in broken else line for i, line in enumerate(lines)]
    path = tmp_path_factory.mktemp("prop") / "data.jsonl"
    path.write_bytes((BOM if bom else b"") + b"\n".join(lines) + b"\n")
    pairs, report = load_preference_dataset(path, bos_tokenizer, config=DataConfig(on_invalid="skip"))
    assert [p.index for p in pairs] == [i for i in range(8) if i not in broken]
    assert report.dropped == ({"invalid_utf8": len(broken)} if broken else {})
    assert [line for m in report.messages.get("invalid_utf8", []) for line in [m.split("(line ")[1].split(")")[0]]] == [
        str(i + 1) for i in sorted(broken)[:3]
    ]


# ---- a byte order mark ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["standard.csv", "standard.jsonl", "standard.json"])
def test_a_byte_order_mark_is_dropped(tmp_path, bos_tokenizer, name):
    expected, _ = load_preference_dataset(FIXTURES / name, bos_tokenizer)
    path = tmp_path / name
    path.write_bytes(BOM + (FIXTURES / name).read_bytes())
    pairs, report = load_preference_dataset(path, bos_tokenizer)  # a BOM'd CSV used to miss its `prompt` column
    assert _ids(pairs) == _ids(expected) and report.kept == report.rows == 4


# ---- mixed formats and duplicates -----------------------------------------------------------------------------------
def test_plain_and_chat_rows_in_one_file_are_counted_with_a_warning(tmp_path, bos_tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _fixture_rows("standard.jsonl")]
    path.write_bytes(_jsonl(plain) + (FIXTURES / "conversational.jsonl").read_bytes())
    with caplog.at_level(logging.WARNING, logger="epsdpo.data.pipeline"):
        pairs, report = load_preference_dataset(path, bos_tokenizer, report_dir=tmp_path)
    assert len(pairs) == 7 and report.formats == {"standard": 4, "conversational": 3}
    (warning,) = report.warnings
    assert warning.startswith("the data mixes 4 plain-text rows with 3 chat rows (lists of messages)")
    assert warning in caplog.text and warning in report.summary()
    assert json.loads((tmp_path / "data_report.json").read_text())["warnings"] == [warning]


def test_one_format_gives_no_warning(bos_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="epsdpo.data.pipeline"):
        _, report = load_preference_dataset(FIXTURES / "conversational.jsonl", bos_tokenizer)
    assert report.warnings == [] and report.duplicates == 0 and caplog.text == ""


def test_duplicate_rows_are_kept_with_a_warning_or_dropped(tmp_path, bos_tokenizer, caplog):
    scored = [(0, 1), (1, 1), (0, 1), (2, 1), (0, 1), (1, 2)]  # row 5 repeats row 1's texts with another score
    rows = [{**_row(i), "score_chosen": score, "score_rejected": 0} for i, score in scored]
    path = tmp_path / "dups.jsonl"
    path.write_bytes(_jsonl(rows))
    with caplog.at_level(logging.WARNING, logger="epsdpo.data.pipeline"):
        pairs, report = load_preference_dataset(path, bos_tokenizer)
    assert [p.index for p in pairs] == [0, 1, 2, 3, 4, 5] and report.duplicates == 2 and not report.dropped
    assert report.warnings == [
        f"2 rows repeat an earlier row's pair (e.g. {path}: row 2 (line 3): the same pair as row 0): kept, so each "
        "weighs more than once in training; set duplicates=drop to drop them."
    ]
    assert report.warnings[0] in caplog.text
    assert report.to_dict()["duplicates"] == 2
    pairs, report = load_preference_dataset(path, bos_tokenizer, config=DataConfig(duplicates="drop"))
    assert [p.index for p in pairs] == [0, 1, 3, 5]  # row 5 differs by its scores: not a duplicate
    assert report.dropped == {"duplicate": 2} and report.rows == report.kept + report.n_dropped
    assert report.warnings[0].endswith("dropped (duplicates=drop).")


def test_duplicates_is_a_checked_option(tmp_path):
    assert load_run_config(None, ["duplicates=drop"]).data.duplicates == "drop"
    with pytest.raises(ConfigError, match="duplicates"):
        load_run_config(None, ["duplicates=remove"])


ROWS = st.lists(st.integers(0, 5), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=ROWS, drop=st.booleans(), as_csv=st.booleans())
def test_property_duplicates_are_every_repeat_and_drop_keeps_first_occurrences(
    tmp_path_factory, bos_tokenizer, order, drop, as_csv
):
    rows = [_row(i) for i in order]
    path = tmp_path_factory.mktemp("dups") / ("data.csv" if as_csv else "data.jsonl")
    if as_csv:
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_bytes(_jsonl(rows))
    source = path
    config = DataConfig(duplicates="drop" if drop else "keep")
    pairs, report = load_preference_dataset(source, bos_tokenizer, config=config)
    first = [i for i, value in enumerate(order) if value not in order[:i]]
    assert report.duplicates == len(order) - len(first)
    assert [p.index for p in pairs] == (first if drop else list(range(len(order))))
    assert report.rows == report.kept + report.n_dropped
    assert bool(report.warnings) == (report.duplicates > 0)
