"""``DataReport``: what happened to every row, counted by reason, and token-length statistics."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataReport", "REPORT_FILE"]

REPORT_FILE = "data_report.json"
PERCENTILES = (50, 90, 95, 99, 100)
MAX_MESSAGES_PER_REASON = 3


@dataclass
class DataReport:
    """Counts for one dataset: ``rows == kept + sum(dropped.values())`` always holds once loading is done.

    Attributes:
        source: the file, directory or dataset id the rows came from.
        rows: rows read.
        kept: pairs that will be trained on.
        dropped: reason -> rows dropped for it (invalid rows under ``on_invalid=skip``; completions truncated to
            nothing; pairs identical after truncation).
        truncated: reason -> kept rows changed for it (``prompt_truncated``, ``chosen_truncated``,
            ``rejected_truncated``; ``chosen_unfinished``/``rejected_unfinished`` for completions the data marks as cut
            at generation, which get no end token; ``duplicate_bos_removed`` when a prompt started with two BOS
            tokens).
        formats: format -> rows of that format (``standard``, ``conversational``, ``implicit_prompt``).
        duplicates: valid rows that read as the same pair as an earlier row (kept or dropped per ``duplicates``).
        warnings: what the data does that is allowed but probably not meant (plain and chat rows mixed, duplicate
            rows), one sentence each.
        lengths: ``prompt``/``chosen``/``rejected`` -> token counts before truncation, one per valid row.
        messages: reason -> the first few full messages (row, column, problem) for that reason.
    """

    source: str = ""
    rows: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    warnings: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})
    messages: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        self._remember(reason, message)

    def truncate(self, reason: str, message: str) -> None:
        self.truncated[reason] += 1
        self._remember(reason, message)

    def note(self, reason: str, message: str) -> None:
        """Keep an example message for ``reason`` without counting a drop or a change (e.g. a kept duplicate)."""
        self._remember(reason, message)

    def _remember(self, reason: str, message: str) -> None:
        kept = self.messages.setdefault(reason, [])
        if len(kept) < MAX_MESSAGES_PER_REASON:
            kept.append(message)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def length_percentiles(self) -> dict[str, dict[str, int]]:
        """``{"prompt": {"p50": …, "p90": …, "max": …}, …}`` over valid rows, before truncation."""
        out: dict[str, dict[str, int]] = {}
        for part, values in self.lengths.items():
            if values:
                qs = np.percentile(np.asarray(values), PERCENTILES, method="higher")
                out[part] = {("max" if p == 100 else f"p{p}"): int(q) for p, q in zip(PERCENTILES, qs, strict=True)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": self.n_dropped,
            "truncated": dict(sorted(self.truncated.items())),
            "formats": dict(sorted(self.formats.items())),
            "duplicates": self.duplicates,
            "warnings": self.warnings,
            "token_lengths_before_truncation": self.length_percentiles(),
            "messages": self.messages,
        }

    def write(self, directory: str | Path, name: str = REPORT_FILE) -> Path:
        """Write :meth:`to_dict` as JSON into ``directory`` (created if needed); returns the file's path."""
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def summary(self) -> str:
        """A few human-readable lines: rows, kept, dropped and truncated by reason, token-length percentiles."""
        lines = [f"{self.source}: {self.rows} rows, {self.kept} kept, {self.n_dropped} dropped"]
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        for title, counts in (("dropped", self.dropped), ("truncated", self.truncated)):
            for reason, count in sorted(counts.items()):
                lines.append(f"  {title} {reason}: {count}")
                lines.extend(f"    e.g. {m}" for m in self.messages.get(reason, [])[:1])
        percentiles = self.length_percentiles()
        if percentiles:
            lines.append("  token lengths before truncation:")
            for part, stats in percentiles.items():
                lines.append(f"    {part:<8} " + "  ".join(f"{k}={v}" for k, v in stats.items()))
        return "\n".join(lines)
