"""Reading a source's files as the user has them, in batches of rows.

Formats: JSON Lines (``.jsonl``, or ``.json`` holding lines), a JSON array (``.json``), parquet and csv, each
optionally compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``; by extension or ``compression:``), from a local
path or any fsspec URL (the store's ``s3://``). A UTF-8 byte-order mark is skipped.

JSON Lines and csv are parsed by pyarrow in blocks (C++, several threads). When pyarrow cannot read a file (a
column whose type changes between rows, a column that first appears after the first block, a malformed line,
bytes that are not UTF-8) it is read again from its start line by line in Python, which either reads it (more
slowly; ``RowReader.engine`` says so) or names the line. Parquet is read a row group at a time. A JSON array is
parsed whole: use JSON Lines for large files.

Rows are numbered from 1 in the order of the file and lines from 1 in the text as the user opens it (after
decompression), so an error can say ``row 8 (line 9)``. Lines of rows that pyarrow parsed are found on demand,
by reading the file again, only when an error needs one.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Collection, Iterator

import fsspec
import pyarrow as pa

from rlhf_core.data.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "csv")
SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
MAGIC = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}
BOM = b"\xef\xbb\xbf"
BATCH_ROWS = 8192  # rows per batch handed to the converters
BLOCK_BYTES = 4 << 20  # pyarrow's parse block (its first block also decides the columns' types); more only costs memory
_CHUNK = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class FileSpec:
    """One file and how to read it."""

    url: str
    format: str  # one of FORMATS
    compression: str | None  # None or a key of MAGIC


@dataclass
class RowBatch:
    rows: list[dict[str, Any]]
    start: int  # 0-based index in the file of the first row
    lines: list[int] | None = None  # 1-based line of each row, when the reader knows it


def split_name(name: str) -> tuple[str, str | None, str | None]:
    """``'train.jsonl.gz'`` -> ``('train', 'jsonl', 'gzip')``; unknown parts are None."""
    base, compression = name, None
    for suffix, comp in SUFFIXES.items():
        if base.lower().endswith(suffix):
            base, compression = base[: -len(suffix)], comp
            break
    for fmt in FORMATS:
        if base.lower().endswith("." + fmt):
            return base[: -len(fmt) - 1], fmt, compression
    return base, None, compression


def resolve(url: str, fmt: str = "auto", compression: str = "auto") -> FileSpec:
    """How to read ``url``: the format and compression given, else those its name says.

    Raises:
        DataError: the name says neither format nor compression can be told, or parquet inside a stream.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    _stem, named_fmt, named_comp = split_name(name)
    comp = named_comp if compression == "auto" else (None if compression == "none" else compression)
    fmt = named_fmt if fmt == "auto" else fmt
    if fmt is None:
        raise DataError(f"{url}: cannot tell the format from the name {name!r}; name it .jsonl, .json, .parquet or "
                        ".csv (optionally followed by .gz, .bz2, .xz or .zst), or set format: and compression:")
    if fmt == "parquet" and comp:
        raise DataError(f"{url}: a parquet file is compressed inside (snappy, zstd or gzip column chunks); give the "
                        f".parquet file itself, not a {comp} stream of it")
    return FileSpec(url, fmt, comp)


def text_file(url: str) -> FileSpec:
    """A plain-text file (the pretraining corpus), decompressed by its name's suffix."""
    _stem, _fmt, compression = split_name(url.rstrip("/").rsplit("/", 1)[-1])
    return FileSpec(url, "text", compression)


def _hex(b: bytes) -> str:
    return " ".join(f"{x:02x}" for x in b) or "nothing (an empty file)"


@contextmanager
def open_stream(spec: FileSpec) -> Iterator[Any]:
    """The file's bytes, decompressed, as a binary file object.

    Raises:
        DataError: the file is missing or a folder, its first bytes contradict the compression (a gzip file
            named .jsonl, a .gz that is not gzip), or the stream is corrupt.
    """
    try:
        raw = fsspec.open(spec.url, "rb").open()
    except FileNotFoundError:
        raise DataError(f"{spec.url}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{spec.url} is a folder; give a file") from None
    try:
        head = raw.read(6)
        raw.seek(0)
        seen = next((c for c, magic in MAGIC.items() if head.startswith(magic)), None)
        if spec.compression is None and seen:
            raise DataError(f"{spec.url} starts with the {seen} signature ({_hex(head[:len(MAGIC[seen])])}): it is "
                            f"{seen}-compressed; add its suffix to the name or set compression: {seen}")
        if spec.compression is None and head.startswith(b"PAR1") and spec.format != "parquet":
            raise DataError(f"{spec.url} starts with PAR1: it is a parquet file; name it .parquet or set format: parquet")
        if spec.compression and not head.startswith(MAGIC[spec.compression]):
            raise DataError(f"{spec.url} is read as {spec.compression} but does not start with its signature "
                            f"({_hex(MAGIC[spec.compression])}); it starts with {_hex(head)}. Set compression: none "
                            "if it is not compressed")
        if spec.compression == "gzip":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif spec.compression == "bz2":
            stream = bz2.BZ2File(raw, "rb")
        elif spec.compression == "xz":
            stream = lzma.LZMAFile(raw, "rb")
        elif spec.compression == "zstd":  # no zstd in the standard library of Python < 3.14; pyarrow has one
            stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")
        else:
            stream = raw
        try:
            yield stream
        except (OSError, EOFError, lzma.LZMAError) as e:
            if isinstance(e, (FileNotFoundError, IsADirectoryError)):
                raise
            raise DataError(f"{spec.url}: the {spec.compression or 'file'} stream is corrupt or truncated ({e})") from None
    finally:
        raw.close()


def iter_lines(stream: Any) -> Iterator[bytes]:
    """Lines of a binary stream without their line ends (``\\r\\n`` too), read a megabyte at a time."""
    tail = b""
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if tail:
        yield tail[:-1] if tail.endswith(b"\r") else tail


def _decode(spec: FileSpec, raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{spec.url}: line {lineno} is not valid UTF-8 (byte {e.start + 1} of the line: "
                        f"{raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8") from None


def text_lines(spec: FileSpec) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 text file (BOM skipped)."""
    with open_stream(spec) as stream:
        for lineno, raw in enumerate(iter_lines(stream), 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            yield lineno, _decode(spec, raw, lineno)


# ----------------------------------------------------------------------------------------------- readers


class RowReader:
    """The rows of one file in batches, and where a row is (for error messages).

    Args:
        spec: the file.
        columns: read only these columns when the format allows (None: all).
        batch_rows: rows per batch.
    """

    def __init__(self, spec: FileSpec, columns: Collection[str] | None = None, batch_rows: int = BATCH_ROWS):
        self.spec, self.columns, self.batch_rows = spec, columns, batch_rows
        self.engine = "pyarrow"  # "python (why)" once the Python reader took over

    @property
    def origin(self) -> str:
        return self.spec.url

    def __iter__(self) -> Iterator[RowBatch]:
        fmt = self.spec.format
        if fmt == "parquet":
            yield from self._parquet()
        elif fmt == "csv":
            yield from self._arrow(csv=True)
        elif fmt == "json" and self._first_char() == "[":
            self.engine = "python (a JSON array is parsed whole)"
            yield from self._json_array()
        else:
            yield from self._arrow(csv=False)

    # -------------------------------------------------------------- where a row is
    def where(self, index: int, batch: RowBatch | None = None) -> str:
        """``'row 8 (line 9)'`` for the 0-based row ``index`` (parquet rows have no line)."""
        line = None
        if batch is not None and batch.lines is not None:
            line = batch.lines[index - batch.start]
        elif self.spec.format != "parquet":
            line = self._line_of(index)
        return f"row {index + 1}" + (f" (line {line})" if line else "")

    def raw_row(self, index: int) -> dict[str, Any] | None:
        """The row as its JSON line holds it (a missing key is not a null), or None for other formats."""
        if self.spec.format not in ("json", "jsonl") or self._first_char() == "[":
            return None
        line = self._line_of(index)
        for lineno, text in text_lines(self.spec):
            if lineno == line:
                obj = json.loads(text)
                return obj if isinstance(obj, dict) else None
        return None

    def _line_of(self, index: int) -> int | None:
        if self.spec.format == "csv":
            for i, line, _record in self._csv_records():
                if i == index:
                    return line
            return None
        if self.spec.format == "json" and self._first_char() == "[":
            for batch in self._json_array():
                if batch.start <= index < batch.start + len(batch.rows):
                    return batch.lines[index - batch.start] if batch.lines else None
            return None
        i = -1
        for lineno, text in text_lines(self.spec):
            if text.strip():
                i += 1
                if i == index:
                    return lineno
        return None

    def _first_char(self) -> str:
        with open_stream(self.spec) as stream:
            head = stream.read(1 << 16)
        text = head[len(BOM):] if head.startswith(BOM) else head
        stripped = text.lstrip()
        return chr(stripped[0]) if stripped else ""

    # ------------------------------------------------------------------- pyarrow
    def _arrow(self, csv: bool) -> Iterator[RowBatch]:
        done = 0
        try:
            with open_stream(self.spec) as stream:
                for batch in self._arrow_batches(stream, csv):
                    batch.validate(full=True)  # pyarrow's JSON parser does not check UTF-8 itself
                    for start in range(0, batch.num_rows, self.batch_rows):
                        rows = self._project(batch.slice(start, self.batch_rows)).to_pylist()
                        yield RowBatch(rows, done)
                        done += len(rows)
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            why = str(e).split("\n", 1)[0]
            self.engine = f"python ({why})"
            yield from (self._csv_python(skip=done) if csv else self._jsonl_python(skip=done))

    def _arrow_batches(self, stream: Any, csv: bool) -> Iterator[pa.RecordBatch]:
        if not csv:
            import pyarrow.json as pj

            yield from pj.open_json(stream, read_options=pj.ReadOptions(block_size=BLOCK_BYTES))
            return
        import pyarrow.csv as pcsv

        header = next((record for _i, _line, record in self._csv_records(header=True)), None)
        if header is None:
            return
        yield from pcsv.open_csv(
            stream, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False))

    def _project(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.columns is None:
            return batch
        keep = [n for n in batch.schema.names if n in self.columns]
        return batch.select(keep)

    def _parquet(self) -> Iterator[RowBatch]:
        import pyarrow.parquet as pq

        done = 0
        with open_stream(self.spec) as stream:
            try:
                # Without pre-buffering and with a small read buffer, memory stays flat however large the file.
                pf = pq.ParquetFile(stream, pre_buffer=False, buffer_size=1 << 20)
                names = pf.schema_arrow.names
                cols = None if self.columns is None else [n for n in names if n in self.columns]
                for batch in pf.iter_batches(batch_size=self.batch_rows, columns=cols):
                    rows = batch.to_pylist()
                    yield RowBatch(rows, done)
                    done += len(rows)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{self.spec.url}: not a readable parquet file ({e})") from None

    # -------------------------------------------------------------------- Python
    def _jsonl_python(self, skip: int = 0) -> Iterator[RowBatch]:
        rows: list[dict[str, Any]] = []
        lines: list[int] = []
        index = 0
        with open_stream(self.spec) as stream:
            for lineno, raw in enumerate(iter_lines(stream), 1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if not raw.strip():
                    continue
                if index < skip:  # already read by pyarrow
                    index += 1
                    continue
                text = _decode(self.spec, raw, lineno)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.spec.url}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{self.spec.url}: line {lineno} is a JSON {type(obj).__name__}; each line must "
                                    "be one JSON object (a row)")
                rows.append(obj)
                lines.append(lineno)
                index += 1
                if len(rows) == self.batch_rows:
                    yield RowBatch(rows, index - len(rows), lines)
                    rows, lines = [], []
        if rows:
            yield RowBatch(rows, index - len(rows), lines)

    def _json_array(self) -> Iterator[RowBatch]:
        url = self.spec.url
        with open_stream(self.spec) as stream:
            blob = stream.read()
        if blob.startswith(BOM):
            blob = blob[len(BOM):]
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError as e:
            line = blob[:e.start].count(b"\n") + 1
            raise DataError(f"{url}: line {line} is not valid UTF-8 ({blob[e.start:e.start + 4]!r}); re-encode the "
                            "file as UTF-8") from None
        decoder = json.JSONDecoder()
        pos = _WS.match(text, 0).end() + 1  # past the "["
        line, counted = 1, 0
        rows: list[dict[str, Any]] = []
        lines: list[int] = []
        index = 0

        def fail(at: int, what: str) -> DataError:
            return DataError(f"{url}: line {text.count(chr(10), 0, at) + 1}: {what}")

        pos = _WS.match(text, pos).end()
        if text.startswith("]", pos):
            return
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{url}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            if not isinstance(obj, dict):
                raise fail(pos, f"element {index + 1} of the array is a JSON {type(obj).__name__}, expected an object")
            rows.append(obj)
            lines.append(line)
            index += 1
            if len(rows) == self.batch_rows:
                yield RowBatch(rows, index - len(rows), lines)
                rows, lines = [], []
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                break
            else:
                raise fail(pos, "expected ',' or ']' after an element of the array")
        if rows:
            yield RowBatch(rows, index - len(rows), lines)

    def _csv_records(self, header: bool = False) -> Iterator[tuple[int, int, list[str]]]:
        """(row index, first line, fields) of each record after the header; with ``header``, only the
        header, as row -1. Records whose field count differs from the header's raise DataError."""
        reader = csv.reader(text + "\n" for _lineno, text in text_lines(self.spec))
        names: list[str] | None = None
        index, next_line = -1, 1
        for record in reader:
            start, next_line = next_line, reader.line_num + 1
            if not record:  # a blank line
                continue
            if names is None:
                names = record
                if header:
                    yield -1, start, record
                    return
                continue
            index += 1
            if len(record) != len(names):
                raise DataError(f"{self.spec.url}: line {start} has {len(record)} fields; the header (line 1) has "
                                f"{len(names)} ({', '.join(names)}). Quote fields that hold commas or line breaks")
            yield index, start, record

    def _csv_python(self, skip: int = 0) -> Iterator[RowBatch]:
        header = next((r for _i, _l, r in self._csv_records(header=True)), [])
        rows: list[dict[str, Any]] = []
        lines: list[int] = []
        first = skip
        for index, line, record in self._csv_records():
            if index < skip:
                continue
            row = dict(zip(header, record))
            rows.append(row if self.columns is None else {k: v for k, v in row.items() if k in self.columns})
            lines.append(line)
            if len(rows) == self.batch_rows:
                yield RowBatch(rows, first, lines)
                first += len(rows)
                rows, lines = [], []
        if rows:
            yield RowBatch(rows, first, lines)


class TableRows:
    """Rows of an in-memory Arrow-backed dataset (a hub split), with the RowReader interface."""

    def __init__(self, dataset: Any, origin: str, columns: Collection[str] | None = None,
                 batch_rows: int = BATCH_ROWS):
        self.dataset, self._origin, self.columns, self.batch_rows = dataset, origin, columns, batch_rows
        self.engine = "datasets"

    @property
    def origin(self) -> str:
        return self._origin

    def __iter__(self) -> Iterator[RowBatch]:
        ds = self.dataset
        if self.columns is not None:
            ds = ds.select_columns([n for n in ds.column_names if n in self.columns])
        done = 0
        for table in ds.with_format("arrow").iter(batch_size=self.batch_rows):
            rows = table.to_pylist()
            yield RowBatch(rows, done)
            done += len(rows)

    def where(self, index: int, batch: RowBatch | None = None) -> str:
        return f"row {index + 1}"

    def raw_row(self, index: int) -> dict[str, Any] | None:
        return None
