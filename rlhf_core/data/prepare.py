"""The data stage: sources -> canonical rows -> per-step split -> filter -> blend -> Arrow in the store.

1. **Read**: every source's files in batches (``reader.py``), each row converted and validated
   (``adapters.py``) and spilled to a local Arrow file (``spill.py``). A bad row stops the stage before anything
   is written, naming its file, row and line; with ``on_invalid: drop`` its bad part is dropped and counted.
2. **Split**: each source's rows are assigned to the steps it feeds (``stages``, in ``data.split``'s
   proportions), train and eval apart, by ``data.split_scheme`` (``splits.py``), so no row is seen by two steps.
3. **Filter**: each step keeps what it can use: sft a chosen answer, reward a rejected one as well, rl prompts
   of at most ``data.max_prompt_tokens`` actor tokens (DeepSpeed-Chat's step-3 filter). Every drop is counted.
4. **Blend**: each step's parts are blended across sources (``splits.py``: by default every row once) and the
   rows written in the blended order (``spill.gather``), never all in memory.

A step that no source feeds (its share is 0, or no source lists it in ``stages``) gets empty sets and is named
in the manifest's ``stages_without_sources``: a run that needs it is refused before it starts
(``check_sources``) and ``load_split`` names it. A step that sources feed but that ends up empty stops the stage.

Output files (Arrow IPC stream, the format ``datasets`` memory-maps)::

    sft/train.arrow sft/eval.arrow reward/train.arrow reward/eval.arrow rl/train.arrow rl/eval.arrow
    ptx/train.arrow ptx/eval.arrow      (only with data.ptx.path)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from rlhf_core.config import DataConfig, PtxConfig, SourceConfig
from rlhf_core.config.views import DataSettings
from rlhf_core.data.adapters import relative_name, source_readers
from rlhf_core.data.convert import SourceConverter
from rlhf_core.data.errors import DataError
from rlhf_core.data.formats import render_prompt
from rlhf_core.data.reader import text_file, text_lines
from rlhf_core.data.spill import Spill, gather
from rlhf_core.data.splits import (blend_deepspeed_chat, blend_default, cut_deepspeed_chat, cut_default, seeded_rng,
                                   shuffled)
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import RL, REWARD, SFT
from rlhf_core.storage.store import Manifest, Store

STAGES = (SFT, REWARD, RL)  # the steps the data is split between
SPLITS = ("train", "eval")
ROW_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("source", pa.string())]
)
TEXT_SCHEMA = pa.schema([("text", pa.string())])
UNFED = "stages_without_sources"  # manifest metric: the steps no source feeds


def feeds(data: DataConfig, src: SourceConfig) -> dict[str, int]:
    """The share of each step a source feeds (0: it does not feed that step)."""
    return {stage: share if stage in src.stages else 0 for stage, share in zip(STAGES, data.split)}


def stages_without_sources(data: DataConfig) -> list[str]:
    """The steps no source feeds."""
    return [stage for stage in STAGES if not any(feeds(data, src)[stage] for src in data.sources)]


def check_sources(data: DataConfig, stages: Iterable[str]) -> None:
    """Refuse, before any work, sources whose files are missing, folders where a file is needed, or whose names
    say no format; and a run that needs a step no source feeds.

    Raises:
        DataError: naming the source, the key and the fix.
    """
    for i, src in enumerate(data.sources):
        try:
            readers = source_readers(src) if src.path else None
        except DataError as e:
            raise DataError(f"data.sources.{i}: {e}") from None
        del readers
    unfed = [s for s in stages_without_sources(data) if s in set(stages)]
    if unfed:
        split = ",".join(map(str, data.split))
        raise DataError(
            f"no source feeds the {' and '.join(unfed)} step (data.split is {split}; sources feed "
            f"{'; '.join(f'{i}: {s.stages}' for i, s in enumerate(data.sources))}), but this run needs it: give it a "
            f"share in data.split, add a source with stages: [{unfed[0]}], or run up to the step before it "
            "(rlhf run --until STAGE)"
        )


# ---------------------------------------------------------------------------------------------- building


@dataclass
class SourceRows:
    """One source as spilled: its rows' ids among the spilled rows, per raw split."""

    index: int
    src: SourceConfig
    converter: SourceConverter
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (first id, rows)
    files: dict[str, list[str]] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)  # file -> reader, when not pyarrow's block parser

    @property
    def label(self) -> str:
        return f"{self.index}:{self.src.name}"


class Flags:
    """What each spilled row can serve: a prompt (the row is valid), a chosen answer, a pair."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {"row": [], "chosen": [], "pair": []}
        self.row = self.chosen = self.pair = np.zeros(0, dtype=bool)

    def add(self, prompts: list, chosen: list, rejected: list) -> None:
        for name, values in (("row", prompts), ("chosen", chosen), ("pair", rejected)):
            self._parts[name].append(np.fromiter((v is not None for v in values), dtype=bool, count=len(values)))

    def freeze(self) -> None:
        for name, parts in self._parts.items():
            setattr(self, name, np.concatenate(parts) if parts else np.zeros(0, dtype=bool))


@dataclass
class BuiltData:
    folder: str  # holds <stage>/<split>.arrow
    metrics: dict[str, Any]

    @property
    def tables(self) -> dict[str, pa.Table]:
        """Every written split as a table (``'sft/train'`` -> table); for tests and small data."""
        out = {}
        for stage in sorted(os.listdir(self.folder)):
            for name in sorted(os.listdir(os.path.join(self.folder, stage))):
                with pa.OSFile(os.path.join(self.folder, stage, name), "rb") as f:
                    out[f"{stage}/{name[:-len('.arrow')]}"] = pa.ipc.open_stream(f).read_all()
        return out


def build_data(settings: DataSettings, folder: str | None = None) -> BuiltData:
    """Read, validate, split, filter and blend every source into ``folder`` (default: a new temporary one).

    Raises:
        DataError: bad input, before any file is written to ``folder``.
    """
    from rlhf_core.models.tokenizers import load_tokenizer

    data = settings.data
    tokenizer = load_tokenizer(settings.actor_tokenizer, role="actor")
    folder = folder or tempfile.mkdtemp(prefix="rlhf-data-")
    with tempfile.TemporaryDirectory(prefix="rlhf-spill-") as tmp:
        spill, flags = Spill(tmp, ROW_SCHEMA), Flags()
        sources = [_spill_source(i, src, spill, flags) for i, src in enumerate(data.sources)]
        flags.freeze()
        chunks = {s.label: _assign(s, flags, data) for s in sources}  # label -> (stage, split) -> ids
        too_long = _too_long(spill, chunks, data, tokenizer)
        kept, per_source = _filter(sources, chunks, flags, too_long)
        outputs, counts = _blend(sources, kept, per_source, data)
        ptx = _ptx_tables(data.ptx, data) if data.ptx.path else {}
        gather(spill, outputs, folder)
    for name, table in ptx.items():
        _write_table(os.path.join(folder, f"{name}.arrow"), table)
        counts[name] = table.num_rows
    dropped_long = sum(s[RL].get(f"{p}_dropped_prompt_too_long", 0) for s in per_source.values() for p in SPLITS)
    metrics = {"rows": counts, "sources": per_source, "prompts_dropped_too_long": dropped_long,
               UNFED: stages_without_sources(data)}
    return BuiltData(folder, metrics)


def _spill_source(index: int, src: SourceConfig, spill: Spill, flags: Flags) -> SourceRows:
    readers = source_readers(src)
    s = SourceRows(index, src, SourceConverter(src, f"{index} ({src.name})"))
    for split, split_readers in (("train", readers.train), ("eval", readers.eval)):
        if not split_readers:
            continue
        first, valid = spill.rows, 0
        for reader in split_readers:
            for _batch, prompts, chosen, rejected in s.converter.rows(reader):
                spill.append({"prompt": prompts, "chosen": chosen, "rejected": rejected,
                              "source": [src.name] * len(prompts)})
                flags.add(prompts, chosen, rejected)
                valid += sum(p is not None for p in prompts)
            name = relative_name(src, reader.origin)
            s.files.setdefault(split, []).append(name)
            if reader.engine != "pyarrow":
                s.engines[name] = reader.engine
        s.parts[split] = (first, spill.rows - first)
        if valid == 0:
            origin = ", ".join(r.origin for r in split_readers)
            raise DataError(f"source {s.converter.label}: every row of {origin} was invalid ({s.converter.dropped})")
    return s


def _shares(data: DataConfig, src: SourceConfig) -> list[int]:
    return list(feeds(data, src).values())


def _assign(s: SourceRows, flags: Flags, data: DataConfig) -> dict[tuple[str, str], np.ndarray]:
    """Spilled ids of each (step, split) of one source, before the steps' filters."""
    src, shares = s.src, _shares(data, s.src)
    first, n = s.parts["train"]
    if data.split_scheme == "default":
        valid = first + np.flatnonzero(flags.row[first:first + n])
        train = shuffled(valid, seeded_rng(data.seed, s.label, "order"))[: src.max_rows]
        if "eval" in s.parts:
            ef, en = s.parts["eval"]
            evals = shuffled(ef + np.flatnonzero(flags.row[ef:ef + en]), seeded_rng(data.seed, s.label, "eval-order"))
        else:  # DeepSpeed-Chat's "9,1" train/eval carve-out for sources without an eval split
            n_eval = max(1, round(len(train) * data.eval_fraction))
            evals, train = train[:n_eval], train[n_eval:]
        cut = {"train": cut_default(train, shares), "eval": cut_default(evals, shares)}
    else:
        train = first + np.arange(min(n, src.max_rows or n), dtype=np.int64)
        if "eval" in s.parts:
            ef, en = s.parts["eval"]
            evals = ef + np.arange(en, dtype=np.int64)
        else:
            keep, held = cut_deepspeed_chat(len(train), (1 - data.eval_fraction, data.eval_fraction), data.seed)
            train, evals = train[keep], train[held]
        cut = {split: [ids[part] for part in cut_deepspeed_chat(len(ids), shares, data.seed)]
               for split, ids in (("train", train), ("eval", evals))}
        cut = {split: [ids[flags.row[ids]] for ids in parts] for split, parts in cut.items()}  # invalid rows out
    return {(stage, split): cut[split][k] for k, stage in enumerate(STAGES) for split in SPLITS}


def token_lengths(texts: list[str], tokenizer) -> np.ndarray:
    """Tokens of each text with special tokens, as ``tokenizer(texts)`` counts them (a fast tokenizer's backend
    counts without building Python id lists)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return np.fromiter((len(e) for e in encode(texts, add_special_tokens=True)), dtype=np.int64, count=len(texts))
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))


def _too_long(spill: Spill, chunks: dict, data: DataConfig, tokenizer) -> np.ndarray:
    """Which spilled rows' prompts exceed data.max_prompt_tokens (only rl's rows are measured)."""
    wanted = np.zeros(spill.rows, dtype=bool)
    for parts in chunks.values():
        for split in SPLITS:
            wanted[parts[(RL, split)]] = True
    out = np.zeros(spill.rows, dtype=bool)
    if not wanted.any():
        return out
    for start, batch in spill.batches(["prompt"]):
        sel = np.flatnonzero(wanted[start:start + batch.num_rows])
        if sel.size == 0:
            continue
        prompts = batch.column(0).take(pa.array(sel)).to_pylist()
        texts = [render_prompt(p, data.prompt_format, tokenizer) for p in prompts]
        out[start + sel] = token_lengths(texts, tokenizer) > data.max_prompt_tokens
    return out


def _filter(sources: list[SourceRows], chunks: dict, flags: Flags, too_long: np.ndarray):
    """Each step's usable rows per source, and the per-source statistics."""
    kept: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    per_source: dict[str, Any] = {}
    usable = {SFT: (flags.chosen, "no_chosen"), REWARD: (flags.pair, "no_rejected"), RL: (~too_long, "prompt_too_long")}
    for s in sources:
        mine = kept[s.label] = {}
        stats: dict[str, Any] = {
            "files": s.files, "rows_read": {split: n for split, (_f, n) in s.parts.items()},
            "rows": {split: int(sum(len(chunks[s.label][(st, split)]) for st in STAGES)) for split in SPLITS},
            "invalid_dropped": s.converter.dropped,
        }
        if s.converter.formats:
            stats["formats"] = s.converter.formats
        if s.engines:
            stats["readers"] = s.engines
        for stage in STAGES:
            ok, reason = usable[stage]
            stats[stage] = {}
            for split in SPLITS:
                ids = chunks[s.label][(stage, split)]
                mine[(stage, split)] = ids[ok[ids]]
                stats[stage][split] = len(mine[(stage, split)])
                if len(ids) > len(mine[(stage, split)]):
                    stats[stage][f"{split}_dropped_{reason}"] = len(ids) - len(mine[(stage, split)])
        per_source[s.label] = stats
    return kept, per_source


def _blend(sources: list[SourceRows], kept: dict, per_source: dict, data: DataConfig):
    """The blended ids of every (step, split), in output order, and their row counts."""
    outputs: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    unfed = set(stages_without_sources(data))
    for stage in STAGES:
        fed = [s for s in sources if feeds(data, s.src)[stage]]
        for split in SPLITS:
            name = f"{stage}/{split}"
            parts = [kept[s.label][(stage, split)] for s in fed]
            if data.split_scheme == "default":
                weighted = split == "train" and fed and fed[0].src.weight is not None
                weights = [s.src.weight for s in fed] if weighted else None
                total = getattr(data.blend_total, stage) if split == "train" else None
                ids, uses = blend_default(parts, weights, total, seeded_rng(data.seed, "blend", stage, split))
                for s, use in zip(fed, uses):
                    per_source[s.label].setdefault("blend", {})[name] = dataclasses.asdict(use)
            else:
                main = [p for s, p in zip(fed, parts) if s.src.stages != [SFT]]
                only = [p for s, p in zip(fed, parts) if s.src.stages == [SFT]] if stage == SFT else []
                ids = blend_deepspeed_chat(main, only, data.seed)
                for s, p in zip(fed, parts):
                    per_source[s.label].setdefault("blend", {})[name] = {"rows": len(p), "used": len(p),
                                                                          "oversampled": 0, "dropped": 0}
            if len(ids) == 0 and stage not in unfed:
                raise DataError(
                    f"split {','.join(map(str, data.split))} leaves the {stage} stage's {split} set empty "
                    f"({_explain_empty(stage, split, fed, per_source)}); give {stage} a larger share or add data"
                )
            outputs[name] = ids
            counts[name] = len(ids)
    return outputs, counts


def _explain_empty(stage: str, split: str, fed: list[SourceRows], per_source: dict[str, Any]) -> str:
    bits = []
    for s in fed:
        st = per_source[s.label][stage]
        reasons = {k.split("_dropped_")[1]: v for k, v in st.items() if k.startswith(f"{split}_dropped_")}
        bits.append(f"{s.label}: {st[split]} rows" + (f", dropped {reasons}" if reasons else ""))
    return "; ".join(bits)


def _ptx_tables(ptx: PtxConfig, data: DataConfig) -> dict[str, pa.Table]:
    try:
        lines = [text for _n, text in text_lines(text_file(ptx.path)) if text.strip()]
    except DataError as e:
        raise DataError(f"pretraining corpus {e}") from None
    if not lines:
        raise DataError(f"pretraining corpus {ptx.path} is empty")
    seeded_rng(data.seed, "ptx").shuffle(lines)
    n_eval = max(1, round(len(lines) * data.eval_fraction))
    if len(lines) - n_eval < 1:
        raise DataError(f"pretraining corpus {ptx.path} has {len(lines)} line(s); it needs at least 2")
    return {
        "ptx/eval": pa.table({"text": lines[:n_eval]}, schema=TEXT_SCHEMA),
        "ptx/train": pa.table({"text": lines[n_eval:]}, schema=TEXT_SCHEMA),
    }


def _write_table(path: str, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


# ------------------------------------------------------------------------------------------------ output


def run_data_stage(ctx: StageContext) -> Manifest:
    """Build and persist the data stage. Every DataError is raised before the first write to the store."""
    metrics: dict[str, Any] = {}

    def write(folder: str) -> None:
        metrics.update(build_data(ctx.settings, folder).metrics)

    return ctx.write_output(write, metrics)


def load_split(store: Store, manifest: Manifest, name: str):
    """A ``datasets.Dataset`` of one stored split (``'sft/train'``), memory-mapped from a local file.

    Raises:
        DataError: the split is empty because no source feeds its step.
        KeyError: the output has no such split.
    """
    import datasets

    rel = f"{name}.arrow"
    manifest.file(rel)  # KeyError naming the output if the split does not exist
    stage = name.split("/", 1)[0]
    if stage in manifest.metrics.get(UNFED, []):
        raise DataError(
            f"{manifest.stage}/{manifest.key} has no {name} rows: no source feeds the {stage} step (its share of "
            f"data.split is 0, or no source lists it in stages); give it a share, add a source with stages: "
            f"[{stage}], or run only up to the step before it (rlhf run --until STAGE)"
        )
    local = store.fetch(manifest.stage, manifest.key, rel)
    return datasets.Dataset.from_file(local)


def source_summary(metrics: dict[str, Any]) -> dict[str, str]:
    """One line per source for the run summary: rows read, used per step (train), oversampled and dropped."""
    lines = {}
    for label, s in metrics.get("sources", {}).items():
        blend = s.get("blend", {})
        used = " ".join(f"{st} {blend[f'{st}/train']['used']}" for st in STAGES if f"{st}/train" in blend)
        over = sum(b["oversampled"] for b in blend.values())
        dropped: dict[str, int] = {}
        for bucket in s.get("invalid_dropped", {}).values():
            for reason, n in bucket.items():
                dropped[reason] = dropped.get(reason, 0) + n
        for stage in STAGES:
            for key, n in s.get(stage, {}).items():
                if "_dropped_" in key:
                    reason = key.split("_dropped_", 1)[1]
                    dropped[reason] = dropped.get(reason, 0) + n
        left_out = sum(b["dropped"] for b in blend.values())
        if left_out:
            dropped["blend"] = left_out
        text = f"read {sum(s.get('rows_read', {}).values())}, used {used or 'none'}"
        if over:
            text += f", oversampled {over}"
        if dropped:
            text += f", dropped {sum(dropped.values())} ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})"
        lines[f"source {label}"] = text
    return lines

