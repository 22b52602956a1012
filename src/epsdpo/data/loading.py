"""Reading rows from every supported source, keeping each row's position so errors can point at it.

Sources: a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file, a directory written by
``Dataset.save_to_disk``, a directory of data files or a Hugging Face Hub id (both through ``datasets.load_dataset``),
a ``datasets.Dataset`` / ``DatasetDict``, or a Python list of dicts.

JSON Lines and CSV are parsed here rather than by ``datasets`` so that a malformed line becomes an error (or, with
``on_invalid=skip``, a counted drop) that names its line, instead of a failure for the whole file; a line that is
not valid UTF-8 is such a line (``invalid_utf8``). A UTF-8 byte order mark at the start of a text file is dropped.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epsdpo.assets import BUNDLED_PREFIX, bundled_dataset
from epsdpo.data.errors import WHOLE_ROW, DataError, RowProblem, RowRef

__all__ = ["RawRows", "load_rows"]

TEXT_SUFFIXES = {".json", ".jsonl", ".csv"}
#: the UTF-8 byte order mark some editors put at the start of a file; it is not part of the first row
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\udc80-\udcff]")
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class RawRows:
    """Rows as read, before any check.

    Attributes:
        source: how to name the source in messages (a path, ``hub-id[split]``, ``<list>``, …).
        rows: one entry per row, in source order (a row that could not be parsed holds ``None``).
        columns: every key seen in the rows, in order of first appearance.
        lines: the 1-based line of each row in a text file, else ``None``.
        problems: row index -> why that row could not be parsed (it stays a row and is counted).
        kind: ``jsonl``, ``json``, ``csv``, ``parquet``, ``datasets`` or ``list``.
    """

    source: str
    rows: list[Any]
    columns: list[str]
    lines: list[int] | None = None
    problems: dict[int, RowProblem] = field(default_factory=dict)
    kind: str = "list"

    def where(self, index: int) -> RowRef:
        return RowRef(self.source, index, self.lines[index] if self.lines is not None else None)


def _columns(rows: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, Mapping):
            seen.update(dict.fromkeys(str(k) for k in row))
    return list(seen)


def _bad_utf8(byte: bytes, column: int | None = None) -> RowProblem:
    where = f" at column {column}" if column is not None else ""
    return RowProblem(
        "invalid_utf8",
        WHOLE_ROW,
        f"is not valid UTF-8 (byte {byte!r}{where})",
        "Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix the line.",
    )


def _read_jsonl(path: Path) -> RawRows:
    rows: list[Any] = []
    lines: list[int] = []
    problems: dict[int, RowProblem] = {}
    with path.open("rb") as handle:
        for line_no, data in enumerate(handle, start=1):
            if line_no == 1:
                data = data.removeprefix(BOM)
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                problems[len(rows)] = _bad_utf8(data[err.start : err.start + 1], err.start + 1)
                rows.append(None)
                lines.append(line_no)
                continue
            if not line.strip():
                continue  # a blank line holds no row
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                problems[len(rows)] = RowProblem(
                    "malformed_json",
                    WHOLE_ROW,
                    f"not valid JSON ({err.msg} at column {err.colno})",
                    "Fix the line so that it holds one JSON object per line.",
                )
                rows.append(None)
            lines.append(line_no)
    return RawRows(str(path), rows, _columns(rows), lines, problems, kind="jsonl")


def _decode_whole(path: Path) -> str:
    """The text of a file read as one value (JSON): invalid UTF-8 is an error naming its line; a BOM is dropped."""
    data = path.read_bytes().removeprefix(BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte {data[err.start : err.start + 1]!r}); save the file as UTF-8.",
            source=str(path),
            reason="invalid_utf8",
        ) from err


def _read_json(path: Path, split: str) -> RawRows:
    text = _decode_whole(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _read_jsonl(path)
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the file, or "
            "write one JSON object per line and name it .jsonl.",
            source=str(path),
            reason="malformed_json",
        ) from err
    if isinstance(data, Mapping):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists:
            data = lists[split]
        elif len(lists) == 1 and len(data) == 1:
            data = next(iter(lists.values()))
        else:
            raise DataError(
                f"{path}: the top level is an object with keys {sorted(map(str, data))}; expected a list of rows "
                f"or an object whose key {split!r} (the split) holds the list of rows.",
                source=str(path),
                reason="malformed_json",
            )
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of row objects, found {type(data).__name__}.",
            source=str(path),
            reason="malformed_json",
        )
    return RawRows(str(path), data, _columns(data), None, kind="json")


def _undecodable_byte(values: Any) -> bytes | None:
    """The first byte that is not UTF-8 in CSV values read with ``surrogateescape`` (it became a lone surrogate)."""
    for value in values:
        if isinstance(value, str) and (found := _SURROGATE.search(value)):
            return bytes([ord(found.group()) - 0xDC00])
    return None


def _read_csv(path: Path) -> RawRows:
    rows: list[Any] = []
    lines: list[int] = []
    problems: dict[int, RowProblem] = {}
    # bytes that are not UTF-8 are kept as lone surrogates, so the row they are in can be named (or skipped)
    text = path.read_bytes().removeprefix(BOM).decode("utf-8", errors="surrogateescape")
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        if _undecodable_byte(header) is not None:
            raise DataError(
                f"{path}, line 1: the header is not valid UTF-8; save the file as UTF-8.",
                source=str(path),
                reason="invalid_utf8",
            )
        start = reader.line_num + 1
        for row in reader:
            byte = _undecodable_byte(row.values())
            if byte is not None:
                problems[len(rows)] = _bad_utf8(byte)
                row = None
            elif None in row or any(v is None for v in row.values()):
                problems[len(rows)] = RowProblem(
                    "malformed_csv",
                    WHOLE_ROW,
                    f"has a different number of fields than the header ({len(header)})",
                    "Quote fields that contain commas or newlines, and give every row one value per column.",
                )
                row = None
            rows.append(row)
            lines.append(start)
            start = reader.line_num + 1
    return RawRows(str(path), rows, header, lines, problems, kind="csv")


def _read_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(
            f"{path}: cannot read as Parquet ({err}); check the file is a complete Parquet file.",
            source=str(path),
            reason="unreadable",
        ) from err
    return RawRows(str(path), rows, _columns(rows), None, kind="parquet")


def _from_datasets(data: Any, source: str, split: str) -> RawRows:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(
                f"{source}: no split {split!r}; splits present: {', '.join(data)}. Set split=NAME.",
                source=source,
                reason="missing_split",
            )
        data, source = data[split], f"{source}[{split}]"
    if not isinstance(data, datasets.Dataset):
        raise DataError(
            f"{source}: expected a datasets.Dataset, got {type(data).__name__}.", source=source, reason="unreadable"
        )
    rows = data.to_list()
    return RawRows(source, rows, list(data.column_names), None, kind="datasets")


def _load_with_datasets(name: str, dataset_config: str | None, split: str) -> RawRows:
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            return _from_datasets(datasets.load_from_disk(str(path)), str(path), split)
        data = datasets.load_dataset(name, dataset_config, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFound…)
        where = "a local directory" if path.is_dir() else "not a local file or directory, and as a Hub dataset id"
        raise DataError(
            f"cannot load dataset {name!r} ({where}): {type(err).__name__}: {err}. Give an existing .json/.jsonl/"
            ".parquet/.csv file, a saved datasets directory, or a Hub id reachable from this machine.",
            source=name,
            reason="unreadable",
        ) from err
    label = f"{name}[{split}]" if dataset_config is None else f"{name}/{dataset_config}[{split}]"
    return _from_datasets(data, label, split)


def load_rows(source: Any, *, dataset_config: str | None = None, split: str = "train") -> RawRows:
    """Read the rows of ``source`` (see the module docstring for the kinds); raises :class:`DataError`."""
    import datasets

    if isinstance(source, datasets.Dataset | datasets.DatasetDict):
        return _from_datasets(source, "<datasets.Dataset>", split)
    if isinstance(source, list):
        return RawRows("<list>", source, _columns(source), None, kind="list")
    if not isinstance(source, str | Path):
        raise DataError(
            f"cannot read preference data from a {type(source).__name__}; give a path, a Hub id, a "
            "datasets.Dataset or a list of dicts.",
            source=repr(source)[:80],
            reason="unreadable",
        )
    if isinstance(source, str) and source.startswith(BUNDLED_PREFIX):
        try:
            source = bundled_dataset(source)
        except FileNotFoundError as err:
            raise DataError(str(err), source=str(source), reason="unreadable") from err
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path, split)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .csv.",
            source=str(path),
            reason="unreadable",
        )
    if suffix in TEXT_SUFFIXES | {".parquet"}:
        raise DataError(f"{path}: file not found; check the path.", source=str(path), reason="unreadable")
    return _load_with_datasets(str(source), dataset_config, split)
