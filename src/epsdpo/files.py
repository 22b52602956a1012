"""Files that other processes, or a later run, read: atomic writes, the one JSONL reader and appender, cache keys."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "cache_key", "read_jsonl", "read_jsonl_resumable", "write_text_atomically"]


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``NAME.PID.partial`` beside it, then rename that into place: a reader sees
    the old file or the new one, never half of one, and processes that write the same path at once each rename a
    complete file of their own (a shared temporary name would let one rename or truncate another's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: str | Path, *, hint: str = "") -> list[dict[str, Any]]:
    """The records of a JSONL file, one JSON value a line; blank lines are skipped.

    A line that is not valid JSON raises ``ValueError`` naming the file and the line (and ``hint``, what to do).
    """
    path = Path(path)
    return _parse_lines(path, path.read_text(encoding="utf-8"), hint)


def _parse_lines(path: Path, text: str, hint: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}){hint}") from err
    return rows


def read_jsonl_resumable(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a JSONL file written by appending; a last line cut short by a kill is removed from the file.

    Returns (rows, whether a truncated line was dropped). A broken line before the last one is an error.
    """
    if not path.exists():
        return [], False
    data = path.read_bytes()
    dropped = False
    if data and not data.endswith(b"\n"):  # the writer was stopped in mid-line: cut the partial line off
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data, dropped = data[:keep], True
    hint = "; the file was not written by an interrupted run. Move it away or fix the line."
    return _parse_lines(path, data.decode("utf-8"), hint), dropped


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append ``records`` as JSON lines and flush them to disk: a kill leaves at most one torn last line, which
    :func:`read_jsonl_resumable` drops."""
    if not records:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def cache_key(model_id: str, pairs: Sequence[Any]) -> str:
    """A key that changes when the model or any token of the data changes (``pairs``: tokenized preference pairs,
    :class:`epsdpo.data.TokenizedPair`)."""
    digest = hashlib.sha256(model_id.encode())
    for p in pairs:
        digest.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return digest.hexdigest()[:24]
