"""Files as users have them: compressed, with a byte-order mark, blank lines, mixed types, csv quoting; errors
that name the row and the line as the user's editor counts them, and what was seen."""

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_core.data import reader
from rlhf_core.data.errors import DataError
from rlhf_core.data.reader import RowReader, resolve

ROWS = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(50)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def read(path, fmt="auto", compression="auto", **kw) -> tuple[list[dict], RowReader]:
    r = RowReader(resolve(str(path), fmt, compression), **kw)
    return [row for batch in r for row in batch.rows], r


def _zstd(blob: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(blob)
    return sink.getvalue().to_pybytes()


COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": _zstd}


@pytest.mark.parametrize("ext", sorted(COMPRESS))
def test_compressed_jsonl_by_extension_and_by_setting(tmp_path, ext):
    named = tmp_path / f"pairs.jsonl.{ext}"
    named.write_bytes(COMPRESS[ext](JSONL))
    assert read(named)[0] == ROWS
    bare = tmp_path / "pairs.jsonl"  # no suffix: compression: says it
    bare.write_bytes(COMPRESS[ext](JSONL))
    codec = {"gz": "gzip", "bz2": "bz2", "xz": "xz", "zst": "zstd"}[ext]
    assert read(bare, compression=codec)[0] == ROWS


def test_compressed_csv_and_json_array(tmp_path):
    csv = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS)
    (tmp_path / "p.csv.gz").write_bytes(gzip.compress(csv.encode()))
    (tmp_path / "p.json.bz2").write_bytes(bz2.compress(json.dumps(ROWS, indent=1).encode()))
    assert read(tmp_path / "p.csv.gz")[0] == ROWS
    assert read(tmp_path / "p.json.bz2")[0] == ROWS


def test_a_gzip_file_without_its_suffix_is_named_as_gzip(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(gzip.compress(JSONL))
    with pytest.raises(DataError, match=r"test.jsonl starts with the gzip signature \(1f 8b\): it is gzip-compressed; "
                                        r"add its suffix to the name or set compression: gzip"):
        read(path)


def test_a_gz_that_is_not_gzip_says_what_it_starts_with(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    path.write_bytes(JSONL)
    with pytest.raises(DataError, match=r"is read as gzip but does not start with its signature \(1f 8b\); it starts "
                                        r"with 7b 22 70 72 6f 6d\. Set compression: none"):
        read(path)


def test_a_truncated_gzip_stream_is_named(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL)[:-30])
    with pytest.raises(DataError, match=r"t.jsonl.gz: the gzip stream is corrupt or truncated"):
        read(path)


def test_parquet_inside_a_compressed_stream_is_refused():
    with pytest.raises(DataError, match=r"a parquet file is compressed inside"):
        resolve("x/train.parquet.gz")
    with pytest.raises(DataError, match=r"cannot tell the format from the name 'train.txt'"):
        resolve("x/train.txt")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_a_byte_order_mark_is_accepted(tmp_path, fmt):
    if fmt == "jsonl":
        text = JSONL.decode()
    elif fmt == "csv":
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS)
    else:
        text = json.dumps(ROWS)
    path = tmp_path / f"bom.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read(path)[0] == ROWS


def test_rows_and_lines_count_from_one_in_the_file_as_opened(tmp_path):
    """Blank lines: row 3 is on line 5; pyarrow read the rows, the line is found when asked."""
    path = tmp_path / "gaps.jsonl.gz"
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   ", json.dumps(ROWS[2])]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    rows, r = read(path)
    assert rows == ROWS[:3] and r.engine == "pyarrow"
    assert r.where(2) == "row 3 (line 5)"
    assert r.where(0) == "row 1 (line 1)"


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(JSONL + b"\n" + b'{"prompt": "x", oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 52 is not valid JSON \(Expecting property name"):
        read(path)


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(JSONL + '{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"line 51 is not valid UTF-8 \(byte 16 of the line: b'\\xe9\"}'\); re-encode"):
        read(path)


def test_a_type_change_after_the_first_block_is_read_by_python(tmp_path, monkeypatch):
    """rejected is null in the first block and text later (an SFT part, then pairs): pyarrow's inferred type
    does not hold, the Python reader takes over from the row it stopped at, and no row is lost or read twice."""
    monkeypatch.setattr(reader, "BLOCK_BYTES", 512)
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": None} for i in range(40)]
    rows += [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"r{i}", "extra": i} for i in range(40, 80)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, r = read(path, batch_rows=7)
    assert r.engine.startswith("python (")
    assert [g["prompt"] for g in got] == [x["prompt"] for x in rows]
    assert got[50] == rows[50]


def test_a_missing_key_and_a_null_are_told_apart(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1]), {"prompt": "q", "chosen": "a"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    _got, r = read(path)
    assert r.raw_row(2) == {"prompt": "q", "chosen": "a"}  # pyarrow filled a null; the line has no key


def test_csv_quoting_and_a_short_row(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\nx,"y, z",w\n\nshort,row\n')
    with pytest.raises(DataError, match=r"q.csv: line 6 has 2 fields; the header \(line 1\) has 3 \(prompt, chosen, "
                                        r"rejected\)"):
        read(path)
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\nx,"y, z",w\n\n4,5,6\n')
    rows, r = read(path)
    assert rows[0]["prompt"] == "two\nlines" and rows[1]["chosen"] == "y, z"
    assert rows[2] == {"prompt": "4", "chosen": "5", "rejected": "6"}  # numbers stay text
    assert r.where(2) == "row 3 (line 6)"


def test_json_array_elements_know_their_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(x) for x in ROWS[:3]) + ",\n  7\n]")
    with pytest.raises(DataError, match=r"a.json: line 5: element 4 of the array is a JSON int"):
        read(path)
    path.write_text("[\n" + ",\n\n".join(json.dumps(x) for x in ROWS[:3]) + "\n]")
    rows, r = read(path)
    assert rows == ROWS[:3] and r.where(2) == "row 3 (line 6)"


def test_parquet_rows_and_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=16)
    rows, r = read(path, columns={"prompt", "chosen"}, batch_rows=10)
    assert rows == [{"prompt": x["prompt"], "chosen": x["chosen"]} for x in ROWS]
    assert r.where(17) == "row 18"


def test_a_folder_or_a_missing_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir.jsonl is a folder; give a file"):
        read(tmp_path / "dir.jsonl")
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        read(tmp_path / "nope.jsonl")


def test_compressed_file_on_the_store(s3_server):
    import fsspec

    with fsspec.open("s3://rlhf-test/raw/hh.jsonl.gz", "wb") as f:
        f.write(gzip.compress(JSONL))
    assert read("s3://rlhf-test/raw/hh.jsonl.gz")[0] == ROWS
