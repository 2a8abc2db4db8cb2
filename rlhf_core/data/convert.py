"""Converting a source's rows to canonical rows, batch by batch: the layout's (or the file format's) converter,
the checks every row gets, and what ``on_invalid`` does with a bad row or a bad part of one.

A converted row is ``(prompt, chosen, rejected)``; ``(None, None, None)`` marks a dropped row, whose place is
kept (DeepSpeed-Chat's split counts every row of the file). Errors name the source, the file and the row and
line, 1-based (``reader.RowReader.where``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from rlhf_core.config import SourceConfig
from rlhf_core.data.adapters import FILES, layout_of, relative_name, source_readers
from rlhf_core.data.conversations import CONVERTERS, FILE_FORMATS, detect_format, mapped_converter, short
from rlhf_core.data.errors import DataError, RowError
from rlhf_core.data.reader import RowBatch, RowReader


@dataclass
class SourceConverter:
    """Canonical rows of one source, batch by batch, with what ``on_invalid: drop`` dropped.

    A converted row is ``(prompt, chosen, rejected)``, or ``(None, None, None)`` for a row that was dropped (its
    place is kept: DeepSpeed-Chat's split counts every row of the file). Under ``on_invalid: drop`` a bad
    rejected answer drops the pair only and a bad chosen answer keeps the prompt for rl.
    """

    src: SourceConfig
    label: str  # "0 (Anthropic/hh-rlhf)"
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> reason -> rows
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format a files source was read in

    def rows(self, reader: Any) -> Iterator[tuple[RowBatch, list[Any], list[Any], list[Any]]]:
        """(batch, prompts, chosen, rejected) for every batch of one file."""
        convert = required = part_of = None
        seen = 0
        for batch in reader:
            if convert is None:
                convert, required, part_of = self._converter(reader, batch)
            prompts, chosen, rejected = [], [], []
            for k, row in enumerate(batch.rows):
                p, c, r = self._one(reader, batch, batch.start + k, row, convert, required, part_of)
                prompts.append(p)
                chosen.append(c)
                rejected.append(r)
            seen += len(batch.rows)
            yield batch, prompts, chosen, rejected
        if seen == 0:
            raise DataError(f"source {self.label}: {reader.origin} has no rows")

    def _converter(self, reader: Any, batch: RowBatch):
        names = set().union(*(r.keys() for r in batch.rows)) if batch.rows else set()
        if self.src.name != FILES:
            layout = layout_of(self.src)
            self._check_columns(reader, names, list(layout.columns))
            return layout.convert, layout.columns, layout.part_of
        if self.src.columns:
            cols = self.src.columns
            if "prompt" not in cols or "chosen" not in cols:
                raise DataError(
                    f"source {self.label} ({reader.origin}): columns must map at least prompt and chosen, e.g. "
                    "columns: {prompt: question, chosen: answer, rejected: bad_answer}; or leave columns out for "
                    "a file in one of TRL's or OpenAI's formats"
                )
            self._check_columns(reader, names, list(cols.values()))
            answer_parts = {cols["chosen"]: "answer", cols.get("rejected"): "pair"}
            return mapped_converter(cols), {}, lambda c: answer_parts.get(c, "row")
        fmt = detect_format(names)
        if fmt is None:
            formats = "; ".join(f"{f}: {', '.join(c)}" for f, c in FILE_FORMATS.items())
            raise DataError(
                f"source {self.label}, {reader.origin}: its columns {sorted(names)} are none of the formats read "
                f"without a mapping ({formats}); map yours with columns: {{prompt: ..., chosen: ..., rejected: ...}}"
            )
        if fmt == "prompt_only" and self.src.stages != ["rl"]:
            raise DataError(
                f"source {self.label}, {reader.origin} holds prompts only (TRL's prompt-only format: no chosen "
                f"answer), so it can feed rl only; set stages: [rl] on this source (it has {self.src.stages})"
            )
        self.formats[relative_name(self.src, reader.origin)] = fmt
        return CONVERTERS[fmt], {}, lambda c: "row"

    def _check_columns(self, reader: Any, names: set[str], required: list[str]) -> None:
        missing = [c for c in required if c not in names]
        if missing:
            found = sorted(names) if reader.columns is None else self._all_columns(reader, names)
            hint = ("map them with columns: {prompt: ..., chosen: ..., rejected: ...}" if self.src.name == FILES else
                    f"check that the file is in the {self.src.name} layout, or use name: files (TRL/OpenAI formats, "
                    "or a columns mapping)")
            raise DataError(f"source {self.label}, {reader.origin}: missing column(s) {missing}; found {found}; {hint}")

    @staticmethod
    def _all_columns(reader: Any, names: set[str]) -> list[str]:
        """Every column of the file (the reader was told to read only some)."""
        whole = type(reader)(reader.spec, None, 64) if isinstance(reader, RowReader) else None
        if whole is None:
            return sorted(names)
        first = next(iter(whole), None)
        return sorted(set().union(*(r.keys() for r in first.rows))) if first and first.rows else sorted(names)

    def _one(self, reader: Any, batch: RowBatch, index: int, row: dict, convert, required, part_of) -> tuple:
        problems: list[RowError] = []
        try:
            for col, expected in required.items():
                value = row.get(col)
                if value is not None and isinstance(value, expected):
                    continue
                problem = _type_problem(row, col, expected)
                problem.part = part_of(col)
                if problem.part == "row":
                    raise problem
                problems.append(problem)
                row = {**row, col: None}
            try:
                prompt, chosen, rejected = convert(row)
            except RowError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise RowError(f"cannot convert ({type(e).__name__}: {e})", "unconvertible") from None
            prompt, chosen, rejected = _check_parts(prompt, chosen, rejected, problems)
        except RowError as e:
            if e.always_drop or self.src.on_invalid == "drop":
                self._count("rows", e.reason)
                return None, None, None
            raise self._error(reader, batch, index, row, e) from None
        for problem in problems:
            if self.src.on_invalid == "error":
                raise self._error(reader, batch, index, row, problem) from None
            self._count("answers" if problem.part == "answer" else "pairs", problem.reason)
            if problem.part == "answer":
                chosen = rejected = None
            else:
                rejected = None
        return prompt, chosen, rejected

    def _count(self, part: str, reason: str) -> None:
        bucket = self.dropped.setdefault(part, {})
        bucket[reason] = bucket.get(reason, 0) + 1

    def _error(self, reader: Any, batch: RowBatch, index: int, row: dict, e: RowError) -> DataError:
        message = str(e)
        column = e.column
        if column is not None and e.reason == "missing":
            if batch.lines is not None:
                present = column in row
            else:
                raw = reader.raw_row(index)
                present = True if raw is None else column in raw
            message = (f"column {column!r} is null" if present else
                       f"column {column!r} is missing from this row (the file's other rows have it)")
        return DataError(f"source {self.label}, {reader.origin}, {reader.where(index, batch)}: {message}. Fix the row, "
                         "or set on_invalid: drop on this source to drop and count such rows (only the bad part: a bad "
                         "rejected answer keeps the row for sft and rl, a bad chosen answer keeps its prompt for rl)")


def _type_problem(row: dict, col: str, expected: Any) -> RowError | None:
    value = row.get(col)
    if value is None:
        return RowError(f"column {col!r} is missing or null", "missing", column=col)
    if not isinstance(value, expected):
        names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        return RowError(f"column {col!r} is {type(value).__name__} ({short(value)}), expected {names}", "wrong_type")
    return None


def _check_parts(prompt: Any, chosen: Any, rejected: Any, problems: list[RowError]) -> tuple[Any, Any, Any]:
    """Validate a converted row; a bad prompt raises, bad answers join ``problems`` and become None."""
    if isinstance(prompt, RowError):
        raise prompt
    if not isinstance(prompt, str):
        raise RowError(f"prompt is {type(prompt).__name__} ({short(prompt)}), expected text", "wrong_type")
    if not prompt or prompt.isspace():
        raise RowError("prompt is empty", "empty")
    if isinstance(chosen, RowError):
        problems.append(chosen)
        chosen = None
    elif chosen is not None and not isinstance(chosen, str):
        problems.append(RowError(f"chosen is {type(chosen).__name__} ({short(chosen)}), expected text", "wrong_type",
                                 "answer"))
        chosen = None
    elif isinstance(chosen, str) and (not chosen or chosen.isspace()):
        problems.append(RowError("chosen is empty", "empty", "answer"))
        chosen = None
    if isinstance(rejected, RowError):
        problems.append(rejected)
        rejected = None
    elif rejected is not None:
        if not isinstance(rejected, str):
            problems.append(RowError(f"rejected is {type(rejected).__name__} ({short(rejected)}), expected text",
                                     "wrong_type", "pair"))
            rejected = None
        elif not rejected or rejected.isspace() or chosen is None:  # an empty rejected is none; a pair needs chosen
            rejected = None
        elif rejected == chosen or rejected.strip() == chosen.strip():
            problems.append(RowError("chosen equals rejected (a pair must differ)", "chosen_equals_rejected", "pair"))
            rejected = None
    return prompt, chosen, rejected


def canonical_rows(src: SourceConfig, split: str = "train") -> list[dict[str, Any]]:
    """Every valid canonical row of one split of a source, in file order (to look at a source; the data stage
    streams instead)."""
    readers = getattr(source_readers(src), split)
    converter = SourceConverter(src, f"({src.name})")
    out = []
    for reader in readers:
        for _batch, prompts, chosen, rejected in converter.rows(reader):
            out += [{"prompt": p, "chosen": c, "rejected": r, "source": src.name}
                    for p, c, r in zip(prompts, chosen, rejected) if p is not None]
    return out
