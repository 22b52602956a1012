"""Writing files that other processes, or a later run, may read at any moment."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomically"]


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``NAME.PID.partial`` beside it, then rename that into place: a reader sees
    the old file or the new one, never half of one, and processes that write the same path at once each rename a
    complete file of their own (a shared temporary name would let one rename or truncate another's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
