"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer (next-token loss)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core.config.views import SFTSettings
from rlhf_core.data.formats import render_answer, render_prompt
from rlhf_core.data.prepare import load_split
from rlhf_core.data.ptx import PtxSchedule, load_blocks
from rlhf_core.engines.training import build_ds_config, initialize
from rlhf_core.models.card import CardMeta, base_name, hub_base, hub_datasets, model_card
from rlhf_core.models.loading import torch_dtype
from rlhf_core.models.causal_lm import build_causal_lm, save_causal_lm
from rlhf_core.models.lora import for_training
from rlhf_core.models.tokenizers import load_tokenizer
from rlhf_core.storage.store import Manifest
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import DATA, LOGS, MODEL, SFT
from rlhf_core.trainers.state import gather_state_dict, load_into_skeleton
from rlhf_core.trainers.metrics import timing_summary
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
    s: SFTSettings = ctx.settings
    ds = load_split(ctx.store, ctx.upstream[DATA], f"{SFT}/{split}")
    prompts = [render_prompt(p, s.prompt_format, tokenizer) for p in ds["prompt"]]
    answers = [render_answer(a, s.prompt_format) for a in ds["chosen"]]
    return tokenize_pairs(prompts, answers, tokenizer, s.sft.max_seq_len, s.sft.mask_prompt)


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
    settings: SFTSettings = ctx.settings
    sft, dist = settings.sft, ctx.dist
    torch.manual_seed(sft.seed)
    tokenizer = load_tokenizer(settings.actor, "actor")
    train, dropped = examples_from_split(ctx, "train", tokenizer)
    evals, _ = examples_from_split(ctx, "eval", tokenizer)
    if not evals:
        raise ValueError("every SFT eval example was truncated away; raise sft.max_seq_len")
    _, total_steps = plan_steps(sft, len(train), dist.world_size)

    ds_config = build_ds_config(sft.deepspeed, sft.optimizer, sft.micro_batch_size, sft.gradient_accumulation_steps,
                                dist.world_size)
    engine = initialize(_build_actor(settings, tokenizer, ds_config), ds_config, sft.optimizer, total_steps)
    pad = tokenizer.pad_token_id
    ptx = None
    if settings.ptx is not None:
        blocks = load_blocks(ctx.store, ctx.upstream[DATA], tokenizer, settings.ptx.block_tokens,
                             settings.ptx.max_blocks)
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
    log, state = run_loop(ctx, engine, spec)
    train_s = time.perf_counter() - t0

    # Saved in the precision it trained in: the module's weights are that dtype (fp32 masters stay in the optimizer).
    dtype = torch_dtype(sft.deepspeed.precision)
    weights = gather_state_dict(engine, dtype)
    if not ctx.is_main:
        return None
    first = next(r for r in log.history if "eval/loss" in r)
    metrics = {
        "eval_loss_before": first["eval/loss"], "eval_loss": log.last("eval/loss"),
        "eval_perplexity": log.last("eval/perplexity"), "train_loss": log.last("loss"),
        "steps": state.global_step, "train_rows": len(train), "dropped_no_answer": dropped,
        "train_seconds": round(train_s, 2), "resumed_from": state.resumed_from, "timing_summary": timing_summary(log.history),
    }

    def write(folder: str) -> None:
        skeleton = load_into_skeleton(_build_actor(settings, tokenizer, for_export=True), weights)
        save_causal_lm(skeleton, tokenizer, os.path.join(folder, MODEL), dtype=dtype,
                       card=model_card("SFT actor", base_name(settings.actor), metrics=metrics, meta=card_meta(ctx)))
        log.export(os.path.join(folder, LOGS), f"SFT {ctx.key[:8]}")

    manifest = ctx.write_output(write, metrics)
    log.close()
    return manifest


def card_meta(ctx: StageContext) -> CardMeta:
    """The SFT card's metadata: the actor's hub base and the hub datasets it was tuned on (the export's card
    takes them from here), its held-out loss and perplexity."""
    settings: SFTSettings = ctx.settings
    return CardMeta(base_model=hub_base(settings.actor), datasets=hub_datasets(ctx.upstream[DATA].config),
                    tags=("sft",), results={"eval_loss": ("loss", "held-out loss"),
                                            "eval_perplexity": ("perplexity", "held-out perplexity")})


def _build_actor(settings: SFTSettings, tokenizer, ds_config: dict | None = None, for_export: bool = False):
    """The actor to train (``ds_config``: partitioned as it loads under ZeRO-3) or, for export, a whole one."""
    sft = settings.sft
    model = build_causal_lm(settings.actor, tokenizer, dropout=sft.dropout, partition_with=ds_config)
    return for_training(model, sft.lora, sft.gradient_checkpointing and not for_export)
