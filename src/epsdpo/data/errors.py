"""Errors about preference data, each naming the source, the row and the column, and saying what to do."""

from __future__ import annotations

from dataclasses import dataclass

from epsdpo.errors import UserError

__all__ = ["WHOLE_ROW", "DataError", "RowProblem", "RowRef"]

#: the ``column`` of a problem with the row as a whole (unparseable line, not an object)
WHOLE_ROW = "<row>"


@dataclass(frozen=True)
class RowRef:
    """Where a row comes from: ``row`` is its 0-based index in the source, ``line`` its 1-based line in a text file."""

    source: str
    row: int
    line: int | None = None

    def __str__(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.source}: row {self.row}{line}"


class RowProblem(Exception):
    """Raised by the per-row checks; the pipeline turns it into a :class:`DataError` or a counted drop.

    ``reason`` is a short code used as the key of the drop counts (``empty_text``, ``wrong_type``, …).
    """

    def __init__(self, reason: str, column: str, problem: str, hint: str) -> None:
        super().__init__(f"column {column!r}: {problem}")
        self.reason = reason
        self.column = column
        self.problem = problem
        self.hint = hint

    def describe(self, where: RowRef) -> str:
        column = "" if self.column == WHOLE_ROW else f", column {self.column!r}"
        return f"{where}{column}: {self.problem}. {self.hint}"


class DataError(UserError, ValueError):
    """Preference data that cannot be used as it is.

    Attributes ``source``, ``row`` (``None`` for a whole-dataset problem), ``column`` and ``reason`` repeat what the
    message says, for programs that handle the error.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        reason: str,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason
        self.row = row
        self.column = column

    @classmethod
    def from_problem(cls, problem: RowProblem, where: RowRef) -> DataError:
        message = (
            f"{problem.describe(where)} (Or set on_invalid=skip to drop such rows; "
            "every dropped row is counted in data_report.json.)"
        )
        return cls(message, source=where.source, reason=problem.reason, row=where.row, column=problem.column)
