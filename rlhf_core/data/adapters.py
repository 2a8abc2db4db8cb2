"""Source adapters: raw rows in each supported layout -> canonical rows.

A canonical row is ``{prompt, chosen, rejected, source}``: ``prompt`` in DeepSpeed-Chat's
" Human: ... Assistant:" text (multi-turn histories keep their turns), ``chosen``/``rejected`` the answers
that follow it, ``rejected`` None for SFT-only sources, ``chosen`` None for prompt-only ones. Each layout below is
the public column layout of that dataset and converts a row the way DeepSpeed-Chat's ``raw_datasets.py`` does,
so a model trained here sees the same text as one trained there; ``Anthropic/hh-rlhf`` is split at the last
assistant turn as TRL and OpenRLHF split it; ``files`` reads TRL's and OpenAI's formats
(``rlhf_core/data/conversations.py``) or any columns through a ``columns:`` mapping.

Rows come from the hub (when reachable, via ``datasets.load_dataset``) or from local / store files in the
same layout (``rlhf_core/data/reader.py``: json, jsonl, parquet, csv, compressed or not), read in batches.
A source's files: one file (its train rows), a folder with ``<train split>.<ext>`` and
``<eval split>.<ext>``, or a folder whose subfolders hold them (HH-RLHF's repository as shipped).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec

from rlhf_core.config import SourceConfig
from rlhf_core.data.conversations import (CONVERTERS, FILE_FORMATS, Converted, detect_format, mapped_converter,
                                          short, split_pair)
from rlhf_core.data.errors import DataError, RowError
from rlhf_core.data.formats import human_prompt
from rlhf_core.data.reader import RowBatch, RowReader, TableRows, resolve, split_name

__all__ = ["DataError", "RowError", "FILES", "LAYOUTS", "Layout", "SourceConverter", "SourceReaders",
           "canonical_rows", "layout_of", "relative_name", "source_files", "source_readers", "source_split_files", "supported_sources"]


@dataclass(frozen=True)
class Layout:
    name: str
    columns: dict[str, type | tuple[type, ...]]  # required top-level columns and their types
    convert: Callable[[dict[str, Any]], Converted]
    train_split: str = "train"
    eval_split: str | None = "test"  # None: carve eval_fraction out of train (DeepSpeed-Chat's "9,1")
    hub_name: str | None = None  # hub dataset when it differs from the layout name (mkqa variants)
    hub_subset: str | None = None
    # The columns of the chosen and rejected answers: a bad one drops only that part (on_invalid: drop).
    answers: tuple[str | None, str | None] = ("chosen", "rejected")
    optional: tuple[str, ...] = ()  # columns read when present
    subset_is_folder: bool = False  # subset: names a folder of the dataset (HH-RLHF's data_dir), not a config

    def part_of(self, column: str) -> str:
        return {self.answers[0]: "answer", self.answers[1]: "pair"}.get(column, "row")


def _sp(text: Any) -> Any:
    """DeepSpeed-Chat's answer: a space, then the text (None stays None)."""
    return None if text is None else " " + text


def _after_cue(text: Any) -> Any:
    return None if text is None else text.split("Assistant:")[-1]


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
    return human_prompt(r["question"]["full_text"]), " " + _strip_citations(good), " " + _strip_citations(bad)


def _shp(r: dict) -> Converted:
    a_better = int(r["labels"]) == 1
    good, bad = (r["human_ref_A"], r["human_ref_B"]) if a_better else (r["human_ref_B"], r["human_ref_A"])
    return human_prompt(r["history"]), " " + good, " " + bad


def _miracl(r: dict) -> Converted:
    negatives = r["negative_passages"]
    rejected = " " + negatives[0]["text"] if negatives else None
    return human_prompt(r["query"]), " " + _first(r["positive_passages"], "positive_passages")["text"], rejected


def _mkqa(lang: str) -> Callable[[dict], Converted]:
    def convert(r: dict) -> Converted:
        return human_prompt(r["queries"][lang]), " " + _first(r["answers"][lang], f"answers.{lang}")["text"], None

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
               lambda r: (human_prompt(r["prompt"]), _sp(r["chosen"]), _sp(r["rejected"])), eval_split=None),
        Layout("yitingxie/rlhf-reward-datasets", {"prompt": _STR, "chosen": _STR, "rejected": _STR},
               lambda r: (r["prompt"] + "Assistant:", _after_cue(r["chosen"]), _after_cue(r["rejected"]))),
        Layout("openai/webgpt_comparisons",
               {"question": dict, "answer_0": _STR, "answer_1": _STR, "score_0": _NUM, "score_1": _NUM},
               _webgpt, eval_split=None),
        Layout("stanfordnlp/SHP", {"history": _STR, "human_ref_A": _STR, "human_ref_B": _STR, "labels": _NUM},
               _shp, eval_split="validation"),
        Layout("pvduy/sharegpt_alpaca_oa_vicuna_format", {"prompt": _STR, "label": _STR},
               lambda r: (r["prompt"].replace("USER", "Human").replace("ASSISTANT", "Assistant"),
                          _sp(r["label"]), None), answers=("label", None)),
        Layout("wangrui6/Zhihu-KOL", {"INSTRUCTION": _STR, "RESPONSE": _STR},
               lambda r: (human_prompt(r["INSTRUCTION"]), _sp(r["RESPONSE"]), None), eval_split=None,
               answers=("RESPONSE", None)),
        Layout("Cohere/miracl-zh-queries-22-12", {"query": _STR, "positive_passages": _LIST, "negative_passages": _LIST},
               _miracl, eval_split="dev"),
        Layout("Hello-SimpleAI/HC3-Chinese", {"question": _STR, "human_answers": _LIST},
               lambda r: (human_prompt(r["question"]), " " + _first(r["human_answers"], "human_answers"), None),
               eval_split=None, hub_subset="all"),
        Layout("mkqa-Chinese", {"queries": dict, "answers": dict}, _mkqa("zh_cn"), eval_split=None, hub_name="mkqa"),
        Layout("mkqa-Japanese", {"queries": dict, "answers": dict}, _mkqa("ja"), eval_split=None, hub_name="mkqa"),
        Layout("Cohere/miracl-ja-queries-22-12", {"query": _STR, "positive_passages": _LIST, "negative_passages": _LIST},
               _miracl, eval_split="dev"),
        Layout("lmqg/qg_jaquad", {"question": _STR, "sentence": _STR},
               lambda r: (human_prompt(r["question"]), _sp(r["sentence"]), None), eval_split="validation",
               answers=("sentence", None)),
        Layout("lmqg/qag_jaquad", {"questions": _LIST, "paragraph": _STR},
               lambda r: (human_prompt(_first(r["questions"], "questions")), _sp(r["paragraph"]), None),
               eval_split="validation", answers=("paragraph", None)),
        # DeepSpeed-Chat's local layout: <path>/data/train.json and <path>/data/eval.json.
        Layout("local/jsonfile", {"prompt": _STR, "chosen": _STR},
               lambda r: (" " + r["prompt"], _sp(r["chosen"]), _sp(r.get("rejected"))), eval_split="eval",
               optional=("rejected",)),
        # HH-RLHF as its repository ships it: <subset>/train.jsonl.gz, <subset>/test.jsonl.gz, whole transcripts.
        Layout("Anthropic/hh-rlhf", {"chosen": _STR, "rejected": _STR},
               lambda r: split_pair(r["chosen"], r["rejected"]), subset_is_folder=True),
    ]
}
FILES = "files"


def supported_sources() -> list[str]:
    return sorted(LAYOUTS) + [FILES]


def layout_of(src: SourceConfig) -> Layout:
    try:
        return LAYOUTS[src.name]
    except KeyError:
        raise DataError(
            f"unknown source {src.name!r}; supported: {', '.join(supported_sources())}. "
            "For any other dataset use name: files with path: (and columns: unless it is in a TRL/OpenAI format)"
        ) from None


# ------------------------------------------------------------------------------------------------ files


def _join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def _kind(url: str) -> str:
    """'file', 'folder' or 'missing'."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        return "folder"
    return "file" if fs.exists(path) else "missing"


def _one_file(src: SourceConfig, key: str, url: str) -> str:
    kind = _kind(url)
    if kind == "missing":
        raise DataError(f"source {src.name}: {key} {url} does not exist")
    if kind == "folder":
        raise DataError(f"source {src.name}: {key} {url} is a folder; a {src.name} source reads one file here: give "
                        "the file (e.g. its train.jsonl)" + ("" if src.name != FILES else
                                                            ", or name the dataset layout the folder has"))
    return url


def _split_files(fs: Any, folder: str, url: str, layout: Layout) -> dict[str, list[str]]:
    """The train and eval files directly in a folder (``train.jsonl``, ``test.jsonl.gz``, ...)."""
    found: dict[str, list[str]] = {"train": [], "eval": []}
    for entry in sorted(fs.ls(folder, detail=True), key=lambda e: e["name"]):
        if entry["type"] == "directory":
            continue
        base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        stem, fmt, _comp = split_name(base)
        if fmt is None:
            continue
        if stem == layout.train_split:
            found["train"].append(_join(url, base))
        elif layout.eval_split and stem == layout.eval_split:
            found["eval"].append(_join(url, base))
    for split, names in found.items():
        if len(names) > 1:
            raise DataError(f"{url} holds {len(names)} {split} files ({', '.join(n.rsplit('/', 1)[-1] for n in names)}); "
                            "keep one, or point path: at one of them")
    return found


def layout_files(src: SourceConfig, layout: Layout) -> dict[str, list[str]]:
    """Local/store files in a layout, per split: a file (train only), a folder with <split>.<ext> files, or a
    folder whose subfolders hold them (each subfolder's files in name order)."""
    assert src.path is not None
    evals = [_one_file(src, "eval_path", src.eval_path)] if src.eval_path else None
    if layout.name == "local/jsonfile":
        train = _one_file(src, "path", _join(src.path, "data", "train.json"))
        default_eval = _join(src.path, "data", "eval.json")
        return {"train": [train], "eval": evals if evals is not None else
                ([default_eval] if _kind(default_eval) == "file" else [])}
    root = _join(src.path, src.subset) if src.subset else src.path
    kind = _kind(root)
    if kind == "missing":
        raise DataError(f"source {src.name}: path {root} does not exist")
    if kind == "file":
        return {"train": [root], "eval": evals or []}
    fs, folder = fsspec.core.url_to_fs(root)
    found = _split_files(fs, folder, root, layout)
    if not found["train"]:
        for entry in sorted(fs.ls(folder, detail=True), key=lambda e: e["name"]):
            if entry["type"] == "directory":
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                sub = _split_files(fs, entry["name"], _join(root, name), layout)
                found["train"] += sub["train"]
                found["eval"] += sub["eval"] if sub["train"] else []
    if not found["train"]:
        raise DataError(f"source {src.name}: {root} has no {layout.train_split}.jsonl/.json/.parquet/.csv file "
                        "(optionally .gz/.bz2/.xz/.zst), in it or in its subfolders")
    if evals is not None:
        found["eval"] = evals
    return found


def source_split_files(src: SourceConfig) -> dict[str, list[str]]:
    """The files a source with ``path:`` reads, per split (``{'train': [...], 'eval': [...]}``)."""
    if src.path is None:
        return {"train": [], "eval": []}
    if src.name == FILES:
        return {"train": [_one_file(src, "path", src.path)],
                "eval": [_one_file(src, "eval_path", src.eval_path)] if src.eval_path else []}
    return layout_files(src, layout_of(src))


def source_files(src: SourceConfig) -> list[str]:
    """The files a source with ``path:`` reads (train, then eval), exactly: its cache key hashes them."""
    files = source_split_files(src)
    return files["train"] + files["eval"]


def relative_name(src: SourceConfig, url: str) -> str:
    """A source file's name relative to the source's path (its name alone for eval_path or a single file)."""
    if src.path and url.startswith(src.path.rstrip("/") + "/"):
        return url[len(src.path.rstrip("/")) + 1:]
    return posixpath.basename(url)


# ----------------------------------------------------------------------------------------------- readers


@dataclass
class SourceReaders:
    """Everything a source reads: per split, the readers of its files in order."""

    train: list[Any]
    eval: list[Any]


def source_readers(src: SourceConfig) -> SourceReaders:
    """The readers of a source's train and eval rows (eval empty: the source has no eval split).

    Raises:
        DataError: a missing file or folder, a name whose format cannot be told, no hub.
    """
    columns = _read_columns(src)
    if src.path is None:
        return _hub_readers(src, layout_of(src), columns)
    files = source_split_files(src)

    def reader(url: str) -> RowReader:
        return RowReader(resolve(url, src.format, src.compression), columns)

    return SourceReaders([reader(u) for u in files["train"]], [reader(u) for u in files["eval"]])


def _read_columns(src: SourceConfig) -> set[str] | None:
    """The columns a source's converter reads (None: all, to detect the format)."""
    if src.name == FILES:
        return set(src.columns.values()) if src.columns else None
    layout = layout_of(src)
    return set(layout.columns) | set(layout.optional) | {c for c in layout.answers if c}


def _hub_readers(src: SourceConfig, layout: Layout, columns: set[str] | None) -> SourceReaders:
    import datasets

    name = layout.hub_name or layout.name
    subset = src.subset or layout.hub_subset
    try:
        ds = (datasets.load_dataset(name, data_dir=subset) if layout.subset_is_folder and subset
              else datasets.load_dataset(name, subset))
    except Exception as e:  # offline, missing, gated: many exception types
        raise DataError(
            f"source {src.name}: could not load {name!r} from the hub ({type(e).__name__}: {e}). "
            "Without a hub, download it elsewhere and point path: at its files"
        ) from None
    train = TableRows(ds[layout.train_split], f"hub:{name}[{layout.train_split}]", columns)
    evals = []
    if layout.eval_split and layout.eval_split in ds:
        evals = [TableRows(ds[layout.eval_split], f"hub:{name}[{layout.eval_split}]", columns)]
    return SourceReaders([train], evals)


# -------------------------------------------------------------------------------------------- conversion


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
