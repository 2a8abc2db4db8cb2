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
from dataclasses import dataclass
from typing import Any, Callable

import fsspec

from rlhf_core.config import SourceConfig
from rlhf_core.data.conversations import Converted, split_pair
from rlhf_core.data.errors import DataError, RowError
from rlhf_core.data.formats import human_prompt
from rlhf_core.data.reader import RowReader, TableRows, resolve, split_name

__all__ = ["DataError", "RowError", "FILES", "LAYOUTS", "Layout", "SourceReaders", "layout_of", "relative_name",
           "source_files", "source_readers", "source_split_files", "supported_sources"]


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
