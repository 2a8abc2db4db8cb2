"""Rows that need not fit in memory: spilled once to a local Arrow file, then written out in any selection and
order, with repeats, holding a bounded number of rows at a time.

``Spill`` appends canonical rows as they are converted and numbers them ``0..n-1``. ``gather`` writes
``outputs[name]`` (spilled row ids, in the order wanted) to ``<folder>/<name>.arrow``. It is an external
shuffle: one pass over the spill routes every wanted row to the bucket of its output position (buckets are
consecutive runs of at most ``bucket_rows`` positions of one output), then each bucket is read, put in order
and appended to its output. Memory: one spill batch and one bucket of rows, plus about 40 bytes per output
position for the index arrays. Each bucket is one record batch of the output, so the same ids give the same
bytes.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUCKET_ROWS = 32768  # rows held at once when writing an output
MAX_BUCKETS = 1024  # files open at once; beyond BUCKET_ROWS * MAX_BUCKETS rows buckets grow instead
POS = "_pos"


class Spill:
    """An append-only local Arrow stream of rows with ``schema``."""

    def __init__(self, folder: str, schema: pa.Schema):
        self.path = os.path.join(folder, "spill.arrow")
        self.schema = schema
        self._sink = pa.OSFile(self.path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self.rows = 0

    def append(self, columns: dict[str, list]) -> None:
        batch = pa.record_batch([pa.array(columns[f.name], f.type) for f in self.schema], schema=self.schema)
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def batches(self, columns: list[str] | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(id of its first row, batch) for every spilled batch, in order."""
        self.close()
        start = 0
        with pa.OSFile(self.path, "rb") as f:
            for batch in pa.ipc.open_stream(f):
                yield start, (batch.select(columns) if columns else batch)
                start += batch.num_rows


def gather(spill: Spill, outputs: dict[str, np.ndarray], folder: str, bucket_rows: int = BUCKET_ROWS) -> None:
    """Write ``<folder>/<name>.arrow`` (an Arrow IPC stream) holding the spilled rows ``outputs[name]``, in order."""
    total = sum(len(ids) for ids in outputs.values())
    size = max(bucket_rows, math.ceil(total / MAX_BUCKETS))
    names = list(outputs)
    first_bucket, src, bucket, pos = [], [], [], []
    nb = 0
    for name in names:
        ids = np.asarray(outputs[name], dtype=np.int64)
        first_bucket.append(nb)
        local = np.arange(len(ids), dtype=np.int64)
        src.append(ids)
        bucket.append(nb + local // size)
        pos.append(local)
        nb += math.ceil(len(ids) / size)
    first_bucket.append(nb)
    all_src = np.concatenate(src) if src else np.zeros(0, np.int64)
    all_bucket = np.concatenate(bucket) if bucket else np.zeros(0, np.int64)
    all_pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    del src, bucket, pos
    order = np.argsort(all_src, kind="stable")
    sorted_src = all_src[order]
    del all_src

    tmp = os.path.join(os.path.dirname(spill.path), "buckets")
    os.makedirs(tmp, exist_ok=True)
    with_pos = spill.schema.append(pa.field(POS, pa.int64()))
    writers: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}
    try:
        for start, batch in spill.batches():
            lo, hi = np.searchsorted(sorted_src, [start, start + batch.num_rows])
            if lo == hi:
                continue
            sel = order[lo:hi]
            taken = batch.take(pa.array(sorted_src[lo:hi] - start))
            b, p = all_bucket[sel], all_pos[sel]
            by_bucket = np.argsort(b, kind="stable")
            b, p = b[by_bucket], p[by_bucket]
            taken = taken.take(pa.array(by_bucket))
            cuts = np.flatnonzero(np.diff(b)) + 1
            for a, z in zip(np.r_[0, cuts], np.r_[cuts, len(b)]):
                key = int(b[a])
                if key not in writers:
                    sink = pa.OSFile(os.path.join(tmp, f"{key}.arrow"), "wb")
                    writers[key] = (sink, pa.ipc.new_stream(sink, with_pos))
                piece = taken.slice(a, z - a)
                writers[key][1].write_batch(pa.record_batch([*piece.columns, pa.array(p[a:z])], schema=with_pos))
    finally:
        for sink, writer in writers.values():
            writer.close()
            sink.close()
    del order, sorted_src, all_bucket, all_pos

    for i, name in enumerate(names):
        path = os.path.join(folder, f"{name}.arrow")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, spill.schema) as writer:
            for key in range(first_bucket[i], first_bucket[i + 1]):
                piece_path = os.path.join(tmp, f"{key}.arrow")
                with pa.OSFile(piece_path, "rb") as f:
                    table = pa.ipc.open_stream(f).read_all()
                table = table.take(pc.sort_indices(table[POS])).drop_columns([POS]).combine_chunks()
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
                os.remove(piece_path)
