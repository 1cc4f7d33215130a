"""Exceptions fastkl raises on purpose."""

from __future__ import annotations


class FastKLError(Exception):
    """Base class of the errors fastkl raises about data or options."""


class InvalidRowError(FastKLError, ValueError):
    """A row is invalid under `on_invalid="raise"`.

    Carries the reason, the row (its index in the input, or inside `file` for
    a job), for a sequence row the position that made it invalid, and how
    many rows of the failing part were invalid.
    """

    def __init__(
        self,
        reason: str,
        row: int,
        count: int,
        *,
        file: str | None = None,
        detail: str = "",
        position: int | None = None,
        unit: str | None = None,
    ) -> None:
        self.reason = reason
        self.row = row
        self.count = count
        self.file = file
        self.detail = detail
        self.position = position
        self.unit = unit  # where in the file the row is: "row group 3" / "record batch 0"
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}: row {self.row}" if self.file else f"row {self.row}"
        if self.unit:
            where += f" ({self.unit})"
        if self.position is not None:
            where += f", position {self.position}"
        msg = f"invalid row ({self.reason}) at {where}"
        if self.detail:
            msg += f": {self.detail}"
        others = self.count - 1
        if others > 0:
            msg += f"; {self.count} invalid rows in this part"
        msg += " (pass on_invalid='null' to keep going)"
        return msg

    def __reduce__(self):  # picklable across Dask worker processes
        return (_rebuild_invalid_row_error, (self.reason, self.row, self.count, self.file, self.detail,
                                                self.position, self.unit))


def _rebuild_invalid_row_error(reason, row, count, file, detail, position=None, unit=None):
    return InvalidRowError(reason, row, count, file=file, detail=detail, position=position, unit=unit)


class OptionError(FastKLError, ValueError):
    """An option or argument is not usable (bad kind, unknown measure, ...)."""


class DataError(FastKLError):
    """Input data is refused: corrupt or mismatched files, missing columns."""


class DestTakenError(FastKLError):
    """DEST is held by another fastkl job that is still running (one job per DEST)."""


class FastKLWarning(UserWarning):
    """Something the user should know although the job did its work (e.g. a leftover it could not remove)."""


class TooManyGroupsError(OptionError):
    """`group_by` met more distinct values than `max_groups`: not a low-cardinality column."""
