"""The data stage: sources -> canonical rows -> per-stage split -> weighted blend -> Arrow in the store.

Order of operations, per source: convert every row (all validation happens here, before anything is
written), hold out an eval part if the source has no eval split, shuffle with a seed, cut train and eval
into the SFT / reward / PPO shares (DeepSpeed-Chat's ``2,4,4``) so that no row is seen by two stages,
then keep what each stage can use (reward needs a rejected answer; PPO drops prompts longer than
``data.max_prompt_tokens`` actor tokens, as DeepSpeed-Chat's step 3 does). Each stage's parts are then
blended across sources with the normalised weights as sampling probabilities.

Output files (Arrow IPC stream, the format ``datasets`` memory-maps)::

    sft/train.arrow sft/eval.arrow reward/train.arrow reward/eval.arrow rl/train.arrow rl/eval.arrow
    ptx/train.arrow ptx/eval.arrow      (only with data.ptx.path)
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rlhf_core.config import DataConfig, PtxConfig, SourceConfig
from rlhf_core.config.views import DataSettings
from rlhf_core.data.adapters import DataError, convert_rows, iter_text_lines, load_raw
from rlhf_core.data.formats import render_prompt
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import RL, REWARD, SFT
from rlhf_core.storage.store import Manifest, Store

STAGES = (SFT, REWARD, RL)  # the steps the data is split between
SPLITS = ("train", "eval")
ROW_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("source", pa.string())]
)
TEXT_SCHEMA = pa.schema([("text", pa.string())])


# ---------------------------------------------------------------------------------------------- building


@dataclass
class BuiltData:
    tables: dict[str, pa.Table]  # "sft/train" -> table
    metrics: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, *salt: str) -> random.Random:
    digest = hashlib.sha256("/".join((str(seed),) + salt).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_by_shares(rows: list, shares: tuple[int, ...]) -> list[list]:
    """Cut rows into consecutive parts proportional to shares (boundaries rounded)."""
    total, n, acc, bounds = sum(shares), len(rows), 0, [0]
    for s in shares:
        acc += s
        bounds.append(round(n * acc / total))
    return [rows[a:b] for a, b in zip(bounds, bounds[1:])]


def build_data(settings: DataSettings) -> BuiltData:
    """Load, validate, split, filter and blend every source. Raises DataError before any output exists."""
    from rlhf_core.models.tokenizers import load_tokenizer

    data = settings.data
    tokenizer = load_tokenizer(settings.actor_tokenizer, role="actor")
    parts: dict[tuple[str, str], list[tuple[SourceConfig, list[dict]]]] = {(s, p): [] for s in STAGES for p in SPLITS}
    per_source: dict[str, Any] = {}

    for index, src in enumerate(data.sources):
        label = f"{index}:{src.name}"
        train_raw, eval_raw = load_raw(src)
        train = convert_rows(src, train_raw)
        rows, dropped = train.rows, dict(train.dropped)
        _rng(data.seed, label, "order").shuffle(rows)
        if src.max_rows:
            rows = rows[: src.max_rows]
        if eval_raw is not None:
            evaluated = convert_rows(src, eval_raw)
            eval_rows = evaluated.rows
            _rng(data.seed, label, "eval-order").shuffle(eval_rows)
            for reason, n in evaluated.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + n
        else:  # DeepSpeed-Chat's "9,1" train/eval carve-out for sources without an eval split
            n_eval = max(1, round(len(rows) * data.eval_fraction))
            eval_rows, rows = rows[:n_eval], rows[n_eval:]
        stats: dict[str, Any] = {"rows": {"train": len(rows), "eval": len(eval_rows)}, "invalid_dropped": dropped}
        for split, split_rows in (("train", rows), ("eval", eval_rows)):
            for stage, chunk in zip(STAGES, split_by_shares(split_rows, data.split)):
                kept, why = _usable(stage, chunk, data, tokenizer)
                parts[(stage, split)].append((src, kept))
                stats.setdefault(stage, {})[split] = len(kept)
                for reason, n in why.items():
                    stats[stage][f"{split}_dropped_{reason}"] = n
        per_source[label] = stats

    tables: dict[str, pa.Table] = {}
    counts: dict[str, int] = {}
    for (stage, split), source_parts in parts.items():
        table = blend(source_parts, data, salt=f"{stage}/{split}")
        if table.num_rows == 0:
            raise DataError(
                f"split {','.join(map(str, data.split))} leaves the {stage} stage's {split} set empty "
                f"({_explain_empty(stage, split, per_source)}); give {stage} a larger share or add data"
            )
        tables[f"{stage}/{split}"] = table
        counts[f"{stage}/{split}"] = table.num_rows

    if data.ptx.path:
        tables.update(_ptx_tables(data.ptx, data))
        counts.update({name: tables[name].num_rows for name in ("ptx/train", "ptx/eval")})

    dropped_long = sum(s[RL].get(f"{p}_dropped_prompt_too_long", 0) for s in per_source.values() for p in SPLITS)
    metrics = {"rows": counts, "sources": per_source, "prompts_dropped_too_long": dropped_long}
    return BuiltData(tables, metrics)


def _usable(stage: str, rows: list[dict], data: DataConfig, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """The rows a stage can use, and how many were dropped for what."""
    if stage == SFT:
        return rows, {}
    if stage == REWARD:
        kept = [r for r in rows if r["rejected"] is not None]
        return kept, ({"no_rejected": len(rows) - len(kept)} if len(kept) < len(rows) else {})
    if not rows:
        return rows, {}
    texts = [render_prompt(r["prompt"], data.prompt_format, tokenizer) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    kept = [r for r, n in zip(rows, lengths) if n <= data.max_prompt_tokens]
    return kept, ({"prompt_too_long": len(rows) - len(kept)} if len(kept) < len(rows) else {})


def _explain_empty(stage: str, split: str, per_source: dict[str, Any]) -> str:
    bits = []
    for label, s in per_source.items():
        reasons = {k.split("_dropped_")[1]: v for k, v in s[stage].items() if k.startswith(f"{split}_dropped_")}
        bits.append(f"{label}: {s[stage][split]} rows" + (f", dropped {reasons}" if reasons else ""))
    return "; ".join(bits)


def blend(source_parts: list[tuple[SourceConfig, list[dict]]], data: DataConfig, salt: str) -> pa.Table:
    """Weighted blend of several sources' rows: the weights, normalised, are the sampling probabilities
    of ``datasets.interleave_datasets`` (seeded)."""
    import datasets

    present = [(src, rows) for src, rows in source_parts if rows]
    if not present:
        return ROW_SCHEMA.empty_table()
    features = datasets.Features({name: datasets.Value("string") for name in ROW_SCHEMA.names})
    dsets = [datasets.Dataset.from_list(rows, features=features) for _src, rows in present]
    if len(dsets) == 1:
        table = dsets[0].data.table
    else:
        total = sum(src.weight for src, _ in present)
        seed = _rng(data.seed, salt).randrange(2**31)
        mixed = datasets.interleave_datasets(
            dsets, probabilities=[src.weight / total for src, _ in present], seed=seed, stopping_strategy=data.blend
        )
        table = mixed.flatten_indices().data.table
    return table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA).combine_chunks()


def _ptx_tables(ptx: PtxConfig, data: DataConfig) -> dict[str, pa.Table]:
    lines = iter_text_lines(ptx.path)
    if not lines:
        raise DataError(f"pretraining corpus {ptx.path} is empty")
    lines = list(lines)
    _rng(data.seed, "ptx").shuffle(lines)
    n_eval = max(1, round(len(lines) * data.eval_fraction))
    if len(lines) - n_eval < 1:
        raise DataError(f"pretraining corpus {ptx.path} has {len(lines)} line(s); it needs at least 2")
    return {
        "ptx/eval": pa.table({"text": lines[:n_eval]}, schema=TEXT_SCHEMA),
        "ptx/train": pa.table({"text": lines[n_eval:]}, schema=TEXT_SCHEMA),
    }


# ------------------------------------------------------------------------------------------------ output


def arrow_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def run_data_stage(ctx: StageContext) -> Manifest:
    """Build and persist the data stage. Every DataError is raised before the first write."""
    built = build_data(ctx.settings)
    with ctx.store.open_output(ctx.stage, ctx.key) as out:
        for name, table in sorted(built.tables.items()):
            out.write_bytes(f"{name}.arrow", arrow_bytes(table))
        return ctx.commit(out, built.metrics)


def load_split(store: Store, manifest: Manifest, name: str):
    """A ``datasets.Dataset`` of one stored split (``'sft/train'``), memory-mapped from a local file."""
    import datasets

    rel = f"{name}.arrow"
    manifest.file(rel)  # KeyError naming the output if the split does not exist
    local = store.fetch(manifest.stage, manifest.key, rel)
    return datasets.Dataset.from_file(local)
