"""Source adapters: raw rows in each supported layout -> canonical rows.

A canonical row is ``{prompt, chosen, rejected, source}``: ``prompt`` in DeepSpeed-Chat's
" Human: ... Assistant:" text (multi-turn histories keep their turns), ``chosen``/``rejected`` the answers
that follow it, ``rejected`` None for SFT-only sources. Each layout below is the public column layout of
that dataset and converts a row the way DeepSpeed-Chat's ``raw_datasets.py`` does, so a model trained
here sees the same text as one trained there.

Rows come from the hub (when reachable, via ``datasets.load_dataset``) or from local / store files in the
same layout (json, jsonl, parquet, csv), which is how the tests and offline users feed them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import fsspec

from rlhf_core.config import SourceConfig

Converted = tuple[Any, Any, Any]  # (prompt, chosen, rejected|None)


class DataError(ValueError):
    """Bad input data; the message names the source, file, row or column and the fix."""


class RowError(DataError):
    """One malformed row; ``reason`` is a short tag used to count dropped rows."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Layout:
    name: str
    columns: dict[str, type | tuple[type, ...]]  # required top-level columns and their types
    convert: Callable[[dict[str, Any]], Converted]
    train_split: str = "train"
    eval_split: str | None = "test"  # None: carve eval_fraction out of train (DeepSpeed-Chat's "9,1")
    hub_name: str | None = None  # hub dataset when it differs from the layout name (mkqa variants)
    hub_subset: str | None = None


def _human(text: str) -> str:
    return " Human: " + text + " Assistant:"


_CITATION = (re.compile(r" [\(\[].*?[\)\]]"), re.compile(r"[\(\[].*?[\)\]]"))


def _strip_citations(text: str) -> str:
    for pattern in _CITATION:
        text = pattern.sub("", text)
    return text


def _first(items: Any, what: str) -> Any:
    if not isinstance(items, (list, tuple)) or not items:
        raise RowError(f"{what} must be a non-empty list", "empty")
    return items[0]


def _webgpt(r: dict) -> Converted:
    a0_better = float(r["score_0"]) >= float(r["score_1"])
    good, bad = (r["answer_0"], r["answer_1"]) if a0_better else (r["answer_1"], r["answer_0"])
    return _human(r["question"]["full_text"]), " " + _strip_citations(good), " " + _strip_citations(bad)


def _shp(r: dict) -> Converted:
    a_better = int(r["labels"]) == 1
    good, bad = (r["human_ref_A"], r["human_ref_B"]) if a_better else (r["human_ref_B"], r["human_ref_A"])
    return _human(r["history"]), " " + good, " " + bad


def _miracl(r: dict) -> Converted:
    negatives = r["negative_passages"]
    rejected = " " + negatives[0]["text"] if negatives else None
    return _human(r["query"]), " " + _first(r["positive_passages"], "positive_passages")["text"], rejected


def _mkqa(lang: str) -> Callable[[dict], Converted]:
    def convert(r: dict) -> Converted:
        return _human(r["queries"][lang]), " " + _first(r["answers"][lang], f"answers.{lang}")["text"], None

    return convert


_STR = str
_LIST = (list, tuple)
_NUM = (int, float, str)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout("Dahoas/rm-static", {"prompt": _STR, "chosen": _STR, "rejected": _STR},
               lambda r: (r["prompt"], r["chosen"], r["rejected"])),
        Layout("Dahoas/full-hh-rlhf", {"prompt": _STR, "chosen": _STR, "rejected": _STR},
               lambda r: (r["prompt"], r["chosen"], r["rejected"])),
        Layout("Dahoas/synthetic-instruct-gptj-pairwise", {"prompt": _STR, "chosen": _STR, "rejected": _STR},
               lambda r: (_human(r["prompt"]), " " + r["chosen"], " " + r["rejected"]), eval_split=None),
        Layout("yitingxie/rlhf-reward-datasets", {"prompt": _STR, "chosen": _STR, "rejected": _STR},
               lambda r: (r["prompt"] + "Assistant:", r["chosen"].split("Assistant:")[-1],
                          r["rejected"].split("Assistant:")[-1])),
        Layout("openai/webgpt_comparisons",
               {"question": dict, "answer_0": _STR, "answer_1": _STR, "score_0": _NUM, "score_1": _NUM},
               _webgpt, eval_split=None),
        Layout("stanfordnlp/SHP", {"history": _STR, "human_ref_A": _STR, "human_ref_B": _STR, "labels": _NUM},
               _shp, eval_split="validation"),
        Layout("pvduy/sharegpt_alpaca_oa_vicuna_format", {"prompt": _STR, "label": _STR},
               lambda r: (r["prompt"].replace("USER", "Human").replace("ASSISTANT", "Assistant"),
                          " " + r["label"], None)),
        Layout("wangrui6/Zhihu-KOL", {"INSTRUCTION": _STR, "RESPONSE": _STR},
               lambda r: (_human(r["INSTRUCTION"]), " " + r["RESPONSE"], None), eval_split=None),
        Layout("Cohere/miracl-zh-queries-22-12", {"query": _STR, "positive_passages": _LIST, "negative_passages": _LIST},
               _miracl, eval_split="dev"),
        Layout("Hello-SimpleAI/HC3-Chinese", {"question": _STR, "human_answers": _LIST},
               lambda r: (_human(r["question"]), " " + _first(r["human_answers"], "human_answers"), None),
               eval_split=None, hub_subset="all"),
        Layout("mkqa-Chinese", {"queries": dict, "answers": dict}, _mkqa("zh_cn"), eval_split=None, hub_name="mkqa"),
        Layout("mkqa-Japanese", {"queries": dict, "answers": dict}, _mkqa("ja"), eval_split=None, hub_name="mkqa"),
        Layout("Cohere/miracl-ja-queries-22-12", {"query": _STR, "positive_passages": _LIST, "negative_passages": _LIST},
               _miracl, eval_split="dev"),
        Layout("lmqg/qg_jaquad", {"question": _STR, "sentence": _STR},
               lambda r: (_human(r["question"]), " " + r["sentence"], None), eval_split="validation"),
        Layout("lmqg/qag_jaquad", {"questions": _LIST, "paragraph": _STR},
               lambda r: (_human(_first(r["questions"], "questions")), " " + r["paragraph"], None),
               eval_split="validation"),
        # DeepSpeed-Chat's local layout: <path>/data/train.json and <path>/data/eval.json.
        Layout("local/jsonfile", {"prompt": _STR, "chosen": _STR},
               lambda r: (" " + r["prompt"], " " + r["chosen"],
                          None if r.get("rejected") is None else " " + r["rejected"]), eval_split="eval"),
    ]
}
FILES = "files"


def supported_sources() -> list[str]:
    return sorted(LAYOUTS) + [FILES]


# ------------------------------------------------------------------------------------------ raw reading


@dataclass
class RawSplit:
    """Raw rows of one split of one source and where they came from (for error messages)."""

    rows: list[dict[str, Any]]
    origin: str


def read_file_rows(url: str, fmt: str = "auto", storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Read json (array or lines), jsonl, parquet or csv from a local path or fsspec URL."""
    if fmt == "auto":
        lowered = url.lower()
        fmt = next((f for f in ("jsonl", "json", "parquet", "csv") if lowered.endswith("." + f)), "")
        if not fmt:
            raise DataError(f"{url}: cannot tell the format from the extension; set format: json|jsonl|parquet|csv")
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            blob = f.read()
    except FileNotFoundError:
        raise DataError(f"{url}: file not found") from None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(blob)).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{url}: not a readable parquet file ({e})") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise DataError(
            f"{url}: line {line} is not valid UTF-8 (byte {e.start}: {blob[e.start:e.start + 4]!r}); "
            "re-encode the file as UTF-8"
        ) from None
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    stripped = text.lstrip()
    if fmt == "json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{url}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{url}: a JSON array of objects is expected")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{url}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{url}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
        rows.append(obj)
    return rows


def _join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def layout_files(src: SourceConfig, layout: Layout) -> dict[str, str | None]:
    """Local/store files in a layout: a file (train only), or a folder with <split>.<ext> files."""
    assert src.path is not None
    if src.eval_path and not _exists(src.eval_path):
        raise DataError(f"source {src.name}: eval_path {src.eval_path} does not exist")
    if layout.name == "local/jsonfile":
        return {"train": _join(src.path, "data", "train.json"),
                "eval": src.eval_path or _join(src.path, "data", "eval.json")}
    fs, root = fsspec.core.url_to_fs(src.path)
    if not fs.isdir(root):
        return {"train": src.path, "eval": src.eval_path}
    found: dict[str, str | None] = {"train": None, "eval": src.eval_path}
    for name in sorted(fs.ls(root, detail=False)):
        base = name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        if ext not in ("json", "jsonl", "parquet", "csv"):
            continue
        if stem == layout.train_split:
            found["train"] = _join(src.path, base)
        elif layout.eval_split and stem == layout.eval_split and not src.eval_path:
            found["eval"] = _join(src.path, base)
    if found["train"] is None:
        raise DataError(
            f"source {src.name}: {src.path} has no {layout.train_split}.json/.jsonl/.parquet/.csv file"
        )
    return found


def source_files(src: SourceConfig) -> list[str]:
    """The files a source with ``path:`` reads (train, then eval when there is one), for its cache key."""
    if src.path is None:
        return []
    if src.name == FILES:
        if src.eval_path and not _exists(src.eval_path):
            raise DataError(f"source {src.name}: eval_path {src.eval_path} does not exist")
        return [src.path] + ([src.eval_path] if src.eval_path else [])
    return [u for u in layout_files(src, layout_of(src)).values() if u and _exists(u)]


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def load_raw(src: SourceConfig) -> tuple[RawSplit, RawSplit | None]:
    """Raw train rows and (if the source has one) eval rows."""
    if src.name == FILES:
        if not src.path:
            raise DataError("a 'files' source needs path: a json/jsonl/parquet/csv file or URL")
        train = RawSplit(read_file_rows(src.path, src.format), src.path)
        evals = RawSplit(read_file_rows(src.eval_path, src.format), src.eval_path) if src.eval_path else None
        return train, evals
    layout = layout_of(src)
    if src.path:
        files = layout_files(src, layout)
        train_url, eval_url = files["train"], files["eval"]
        assert train_url is not None
        fmt = src.format if src.format != "auto" else ("json" if train_url.endswith(".json") else "auto")
        train = RawSplit(read_file_rows(train_url, fmt), train_url)
        evals = None
        if eval_url and _exists(eval_url):
            evals = RawSplit(read_file_rows(eval_url, fmt), eval_url)
        return train, evals
    return _load_hub(src, layout)


def _load_hub(src: SourceConfig, layout: Layout) -> tuple[RawSplit, RawSplit | None]:
    import datasets

    name = layout.hub_name or layout.name
    subset = src.subset or layout.hub_subset
    try:
        ds = datasets.load_dataset(name, subset)
    except Exception as e:  # offline, missing, gated: many exception types
        raise DataError(
            f"source {src.name}: could not load {name!r} from the hub ({type(e).__name__}: {e}). "
            "Without a hub, download it elsewhere and point path: at its files"
        ) from None
    train = RawSplit(ds[layout.train_split].to_list(), f"hub:{name}[{layout.train_split}]")
    evals = None
    if layout.eval_split and layout.eval_split in ds:
        evals = RawSplit(ds[layout.eval_split].to_list(), f"hub:{name}[{layout.eval_split}]")
    return train, evals


def layout_of(src: SourceConfig) -> Layout:
    try:
        return LAYOUTS[src.name]
    except KeyError:
        raise DataError(
            f"unknown source {src.name!r}; supported: {', '.join(supported_sources())}. "
            "For any other dataset use name: files with path: and columns:"
        ) from None


# ------------------------------------------------------------------------------------------- conversion


@dataclass
class CanonicalRows:
    rows: list[dict[str, Any]]
    dropped: dict[str, int]  # reason -> rows dropped (on_invalid: drop)


def convert_rows(src: SourceConfig, raw: RawSplit) -> CanonicalRows:
    """Canonical rows of one raw split. Malformed rows raise DataError (or are dropped and counted when
    the source says on_invalid: drop)."""
    if not raw.rows:
        raise DataError(f"source {src.name}: {raw.origin} has no rows")
    if src.name == FILES:
        convert, required = _files_converter(src), {v: None for v in src.columns.values()}
        if "prompt" not in src.columns or "chosen" not in src.columns:
            raise DataError(
                f"source files ({raw.origin}): columns must map at least prompt and chosen, e.g. "
                "columns: {prompt: question, chosen: answer, rejected: bad_answer}"
            )
    else:
        layout = layout_of(src)
        convert, required = layout.convert, layout.columns
    _check_columns(src, raw, list(required))
    out: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for i, row in enumerate(raw.rows):
        try:
            _check_types(row, required)
            try:
                prompt, chosen, rejected = convert(row)
            except RowError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise RowError(f"cannot convert ({type(e).__name__}: {e})", "unconvertible") from None
            _check_converted(prompt, chosen, rejected)
        except RowError as e:
            if src.on_invalid == "drop":
                dropped[e.reason] = dropped.get(e.reason, 0) + 1
                continue
            raise DataError(
                f"source {src.name}, {raw.origin}, row {i}: {e}. Fix the row, or set on_invalid: drop on "
                "this source to drop and count such rows"
            ) from None
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": src.name})
    if not out:
        raise DataError(f"source {src.name}: every row of {raw.origin} was invalid ({dropped})")
    return CanonicalRows(out, dropped)


def _files_converter(src: SourceConfig) -> Callable[[dict], Converted]:
    cols = src.columns

    def convert(r: dict) -> Converted:
        # Plain questions are put in DeepSpeed-Chat's format; prompts already in it are kept as they are.
        prompt, chosen = r[cols["prompt"]], r[cols["chosen"]]
        rejected = r.get(cols["rejected"]) if "rejected" in cols else None
        if isinstance(prompt, str) and "Assistant:" not in prompt:
            prompt = _human(prompt.strip())
        return prompt, _lead(chosen), _lead(rejected)

    return convert


def _lead(answer: Any) -> Any:
    return " " + answer.lstrip() if isinstance(answer, str) and answer.strip() else answer


def _check_columns(src: SourceConfig, raw: RawSplit, required: list[str]) -> None:
    present: set[str] = set()
    for row in raw.rows[:1000]:
        present |= set(row)
    missing = [c for c in required if c not in present]
    if missing:
        hint = (
            "map them with columns: {prompt: ..., chosen: ..., rejected: ...}"
            if src.name == FILES
            else f"check that the file is in the {src.name} layout, or use name: files with a columns mapping"
        )
        raise DataError(
            f"source {src.name}, {raw.origin}: missing column(s) {missing}; found {sorted(present)}; {hint}"
        )


def _check_types(row: dict, required: dict[str, Any]) -> None:
    for col, expected in required.items():
        if expected is None:
            continue
        value = row.get(col)
        if value is None:
            raise RowError(f"column {col!r} is missing or null", "missing")
        if not isinstance(value, expected):
            names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise RowError(f"column {col!r} is {type(value).__name__} ({_short(value)}), expected {names}", "wrong_type")


def _check_converted(prompt: Any, chosen: Any, rejected: Any) -> None:
    for name, value in (("prompt", prompt), ("chosen", chosen)):
        if not isinstance(value, str):
            raise RowError(f"{name} is {type(value).__name__} ({_short(value)}), expected text", "wrong_type")
        if not value.strip():
            raise RowError(f"{name} is empty", "empty")
    if rejected is not None:
        if not isinstance(rejected, str):
            raise RowError(f"rejected is {type(rejected).__name__} ({_short(rejected)}), expected text", "wrong_type")
        if rejected.strip() == chosen.strip():
            raise RowError("chosen equals rejected (a pair must differ)", "chosen_equals_rejected")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def iter_text_lines(url: str) -> Iterable[str]:
    """Lines of a UTF-8 plain-text corpus (local path or URL); DataError names a bad line."""
    try:
        with fsspec.open(url, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise DataError(f"pretraining corpus {url}: file not found") from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise DataError(f"pretraining corpus {url}: line {line} is not valid UTF-8; re-encode it as UTF-8") from None
    return [line for line in text.splitlines() if line.strip()]
