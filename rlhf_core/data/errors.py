"""The data layer's errors: one for bad input as a whole, one for one bad row (or part of a row)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the source, file, row or column and the fix."""


class RowError(DataError):
    """One malformed row, or one malformed part of it.

    ``reason`` is a short tag that counts dropped rows; ``part`` is what is bad: ``'row'`` (nothing of it can be
    used), ``'answer'`` (the chosen answer: its prompt still serves rl), ``'pair'`` (the rejected answer: the row
    still serves sft and rl). ``always_drop`` marks rows that are dropped and counted whatever ``on_invalid``
    says (HH-RLHF pairs whose transcripts do not share the prompt).
    """

    def __init__(self, message: str, reason: str, part: str = "row", always_drop: bool = False,
                 column: str | None = None):
        super().__init__(message)
        self.reason, self.part, self.always_drop, self.column = reason, part, always_drop, column
