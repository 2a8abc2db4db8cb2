"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer (next-token loss)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core.stages import registry as stages
from rlhf_core.data.formats import render_answer, render_prompt
from rlhf_core.data.prepare import load_split
from rlhf_core.engines.training import build_ds_config, initialize
from rlhf_core.models.causal_lm import build_causal_lm, save_causal_lm
from rlhf_core.models.lora import for_training
from rlhf_core.models.tokenizers import load_tokenizer
from rlhf_core.storage.store import Manifest
from rlhf_core.trainers.state import StageContext, gather_state_dict, load_into_skeleton, put_logs
from rlhf_core.trainers.loop import LoopSpec, plan_steps, run_loop

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def tokenize_pairs(prompts: list[str], answers: list[str], tokenizer, max_len: int, mask_prompt: bool) -> tuple[list[Example], int]:
    """prompt tokens (with the tokenizer's BOS) + answer tokens + EOS, truncated to max_len; returns the
    examples and how many were dropped for having no answer token left."""
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    out, dropped = [], 0
    for p, a in zip(p_ids, a_ids):
        ids = (p + a + [tokenizer.eos_token_id])[:max_len]
        n_prompt = min(len(p), len(ids))
        if n_prompt >= len(ids):
            dropped += 1
            continue
        labels = ([IGNORE] * n_prompt + ids[n_prompt:]) if mask_prompt else list(ids)
        out.append(Example(ids, labels))
    return out, dropped


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels [B, T]."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    logits [B, T, V], labels [B, T] -> (loss sum [], tokens []).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (shift_labels != IGNORE).sum()


def label_tokens(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE)


def examples_from_split(ctx: StageContext, split: str, tokenizer) -> tuple[list[Example], int]:
    data = ctx.upstream[stages.DATA]
    ds = load_split(ctx.store, data, f"sft/{split}")
    fmt = ctx.cfg.data.prompt_format
    prompts = [render_prompt(p, fmt, tokenizer) for p in ds["prompt"]]
    answers = [render_answer(a, fmt) for a in ds["chosen"]]
    return tokenize_pairs(prompts, answers, tokenizer, ctx.cfg.sft.max_seq_len, ctx.cfg.sft.mask_prompt)


def evaluate_lm(engine, examples: list[Example], pad_id: int, micro: int, rank: int, world: int,
                device: torch.device) -> dict[str, float]:
    """Token-mean loss and perplexity over examples (sharded over ranks, summed with all-reduce)."""
    engine.eval()
    mine = examples[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(0, max(len(mine), 1), micro):
            chunk = mine[i:i + micro]
            if not chunk:  # keep ZeRO-3 collectives in step on a rank with fewer rows
                chunk = examples[:1]
                weight = 0.0
            else:
                weight = 1.0
            batch = collate(chunk, pad_id, device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, n = token_loss_sum(logits, batch["labels"])
            total += weight * torch.stack([s.double(), n.double()])
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_sft(ctx: StageContext) -> Manifest | None:
    cfg, sft, dist = ctx.cfg, ctx.cfg.sft, ctx.dist
    torch.manual_seed(sft.seed)
    tokenizer = load_tokenizer(cfg.models.actor, "actor")
    train, dropped = examples_from_split(ctx, "train", tokenizer)
    evals, _ = examples_from_split(ctx, "eval", tokenizer)
    if not evals:
        raise ValueError("every SFT eval example was truncated away; raise sft.max_seq_len")
    _, total_steps = plan_steps(sft, len(train), dist.world_size)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(sft.deepspeed.precision, torch.float32)
    ds_config = build_ds_config(sft.deepspeed, sft.optimizer, sft.micro_batch_size, sft.gradient_accumulation_steps,
                                dist.world_size)
    engine = initialize(_build_actor(ctx, tokenizer, ds_config), ds_config, sft.optimizer, total_steps)
    pad = tokenizer.pad_token_id
    ptx = None
    if sft.ptx_coef > 0:
        from rlhf_core.data.ptx import PtxSchedule, load_blocks

        blocks = load_blocks(ctx.store, ctx.upstream[stages.DATA], tokenizer, cfg.data.ptx.block_tokens,
                             cfg.data.ptx.max_blocks)
        ptx = PtxSchedule(blocks, sft.micro_batch_size, dist.rank, dist.world_size, sft.seed + 1)

    def step(rows: list[int], window_units: float, micro_index: int):
        batch = collate([train[i] for i in rows], pad, dist.device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, n = token_loss_sum(logits, batch["labels"])
        loss = s * dist.world_size * sft.gradient_accumulation_steps / window_units
        metrics = {"sum/loss": s.detach()}
        if ptx is not None:
            # DeepSpeed averages micro-batches and ranks, so the coefficient weighs the mean ptx loss.
            ids = ptx.batch(micro_index).to(dist.device)
            ps, pn = token_loss_sum(engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids)
            loss = loss + sft.ptx_coef * ps / pn
            metrics["sum/ptx_loss"] = (ps / pn).detach() * window_units / (dist.world_size * sft.gradient_accumulation_steps)
        return loss, metrics

    spec = LoopSpec(sft, len(train), lambda rows: sum(label_tokens(train[i]) for i in rows), step,
                    lambda: evaluate_lm(engine, evals, pad, sft.micro_batch_size, dist.rank, dist.world_size, dist.device))
    t0 = time.perf_counter()
    log = run_loop(ctx, engine, spec)
    train_s = time.perf_counter() - t0

    export_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.export.dtype, torch.float32)
    state = gather_state_dict(engine, export_dtype if dtype != torch.float32 else None)
    if not ctx.is_main:
        return None
    first = next(r for r in log.history if "eval/loss" in r)
    metrics = {
        "eval_loss_before": first["eval/loss"], "eval_loss": log.last("eval/loss"),
        "eval_perplexity": log.last("eval/perplexity"), "train_loss": log.last("loss"),
        "steps": max(r["step"] for r in log.history), "train_rows": len(train), "dropped_no_answer": dropped,
        "train_seconds": round(train_s, 2),
        "resumed_from": log.resumed_from,
    }
    with ctx.store.open_output(ctx.stage, ctx.key) as out, tempfile.TemporaryDirectory() as tmp:
        skeleton = _build_actor(ctx, tokenizer, for_export=True)
        load_into_skeleton(skeleton, state)
        save_causal_lm(skeleton, tokenizer, os.path.join(tmp, "model"), dtype=export_dtype,
                       card=_card("SFT actor", cfg.models.actor.name_or_path or "architecture", metrics))
        out.put_dir(os.path.join(tmp, "model"), "model")
        put_logs(out, log, tmp, f"SFT {ctx.key[:8]}")
        manifest = out.commit(stage_version=stages.VERSIONS[stages.SFT], config=stages.sft_config(cfg),
                              upstream=ctx.upstream, metrics=metrics, producer=ctx.producer)
    log.close()
    return manifest


def _build_actor(ctx: StageContext, tokenizer, ds_config: dict | None = None, for_export: bool = False):
    """The actor to train (``ds_config``: partitioned as it loads under ZeRO-3) or, for export, a whole one."""
    sft = ctx.cfg.sft
    model = build_causal_lm(ctx.cfg.models.actor, tokenizer, dropout=sft.dropout, partition_with=ds_config)
    return for_training(model, sft.lora, sft.gradient_checkpointing and not for_export)


def _card(title: str, base: str, metrics: dict) -> str:
    """A short model card; wall-clock numbers and resume history stay in the manifest, so that the same
    training gives byte-identical model folders however often it was interrupted."""
    lines = [f"# {title}", "", f"Base: `{base}`. Trained by rlhf-flow.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in metrics.items() if not k.endswith("seconds") and k != "resumed_from"]
    return "\n".join(lines) + "\n"
