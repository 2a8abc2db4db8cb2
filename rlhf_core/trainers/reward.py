"""Step 2: the reward model, trained with the pairwise ranking loss -log sigmoid(r_chosen - r_rejected)
(InstructGPT eq. 1) on the score at each sequence's last real token."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core.config.views import RewardSettings
from rlhf_core.data.formats import render_answer, render_prompt
from rlhf_core.data.prepare import load_split
from rlhf_core.engines.training import build_ds_config, initialize
from rlhf_core.maths.algos import masked_mean_var
from rlhf_core.models.card import CardMeta, base_name, hub_base, hub_datasets, model_card
from rlhf_core.models.lora import for_training, merge_lora
from rlhf_core.models.reward_model import RewardMeta, build_reward_model, save_reward_model, sequence_scores
from rlhf_core.models.tokenizers import load_tokenizer
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import DATA, LOGS, MODEL, REWARD
from rlhf_core.storage.store import Manifest
from rlhf_core.trainers.metrics import timing_summary
from rlhf_core.trainers.loop import LoopSpec, plan_steps, run_loop
from rlhf_core.trainers.state import gather_state_dict, load_into_skeleton


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]


def tokenize_preferences(ctx: StageContext, split: str, tokenizer) -> list[Pair]:
    settings: RewardSettings = ctx.settings
    ds = load_split(ctx.store, ctx.upstream[DATA], f"{REWARD}/{split}")
    fmt, max_len, eos = settings.prompt_format, settings.reward.max_seq_len, tokenizer.eos_token_id
    prompts = tokenizer([render_prompt(p, fmt, tokenizer) for p in ds["prompt"]], add_special_tokens=True)["input_ids"]
    chosen = tokenizer([render_answer(a, fmt) for a in ds["chosen"]], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([render_answer(a, fmt) for a in ds["rejected"]], add_special_tokens=False)["input_ids"]
    return [Pair((p + c + [eos])[:max_len], (p + r + [eos])[:max_len]) for p, c, r in zip(prompts, chosen, rejected)]


def collate_pairs(pairs: list[Pair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows first, then rejected rows, right-padded: input_ids, attention_mask [2B, T]."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pair_scores(engine, pairs: list[Pair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = collate_pairs(pairs, pad_id, device)
    scores = _score(engine, ids, mask)
    return scores[: len(pairs)], scores[len(pairs):]


def _score(engine, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] through the engine (so ZeRO-3 gathers parameters as it goes)."""
    return sequence_scores(engine(ids, mask), mask)


def evaluate_reward(engine, pairs: list[Pair], pad_id: int, micro: int, rank: int, world: int,
                    device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """Pairwise accuracy and mean chosen/rejected scores; also every score (for the normalising stats)."""
    engine.eval()
    mine = pairs[rank::world]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct, chosen, rejected, n
    all_scores = []
    with torch.no_grad():
        for i in range(0, max(len(mine), 1), micro):
            chunk = mine[i:i + micro] or pairs[:1]
            weight = 1.0 if mine[i:i + micro] else 0.0
            ids, mask = collate_pairs(chunk, pad_id, device)
            s = _score(engine, ids, mask).double()
            c, r = s[: len(chunk)], s[len(chunk):]
            sums += weight * torch.stack([(c > r).sum(), c.sum(), r.sum(), torch.tensor(float(len(chunk)), device=device)])
            if weight:
                all_scores.append(s.cpu())
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(sums)
    n = sums[3].clamp(min=1)
    metrics = {"accuracy": (sums[0] / n).item(), "chosen_score": (sums[1] / n).item(),
               "rejected_score": (sums[2] / n).item()}
    return metrics, torch.cat(all_scores) if all_scores else torch.zeros(0, dtype=torch.float64)


def train_reward(ctx: StageContext) -> Manifest | None:
    settings: RewardSettings = ctx.settings
    rw, dist = settings.reward, ctx.dist
    torch.manual_seed(rw.seed)
    tokenizer = load_tokenizer(settings.reward_model, "reward")
    train = tokenize_preferences(ctx, "train", tokenizer)
    evals = tokenize_preferences(ctx, "eval", tokenizer)
    _, total_steps = plan_steps(rw, len(train), dist.world_size)
    ds_config = build_ds_config(rw.deepspeed, rw.optimizer, rw.micro_batch_size, rw.gradient_accumulation_steps,
                                dist.world_size)
    engine = initialize(_build(settings, tokenizer, ds_config), ds_config, rw.optimizer, total_steps)
    pad = tokenizer.pad_token_id

    def step(rows: list[int], window_units: float, _micro_index: int):
        chosen, rejected = pair_scores(engine, [train[i] for i in rows], pad, dist.device)
        losses = -F.logsigmoid(chosen - rejected)
        loss = losses.sum() * dist.world_size * rw.gradient_accumulation_steps / window_units
        return loss, {"sum/loss": losses.sum().detach(), "sum/accuracy": (chosen > rejected).sum().detach(),
                      "sum/margin": (chosen - rejected).sum().detach()}

    def evaluate():
        return evaluate_reward(engine, evals, pad, rw.micro_batch_size, dist.rank, dist.world_size, dist.device)[0]

    spec = LoopSpec(rw, len(train), len, step, evaluate)
    t0 = time.perf_counter()
    log, state = run_loop(ctx, engine, spec)
    train_s = time.perf_counter() - t0

    _, scores = evaluate_reward(engine, evals, pad, rw.micro_batch_size, dist.rank, dist.world_size, dist.device)
    mean, var = masked_mean_var(scores, torch.ones_like(scores), across_ranks=True)
    mean, std = float(mean), float(var) ** 0.5
    weights = gather_state_dict(engine)
    if not ctx.is_main:
        return None
    first = next(r for r in log.history if "eval/accuracy" in r)
    metrics = {
        "eval_accuracy_before": first["eval/accuracy"], "eval_accuracy": log.last("eval/accuracy"),
        "eval_chosen_score": log.last("eval/chosen_score"), "eval_rejected_score": log.last("eval/rejected_score"),
        "score_mean": mean, "score_std": std, "train_loss": log.last("loss"),
        "steps": state.global_step, "train_pairs": len(train), "train_seconds": round(train_s, 2),
        "resumed_from": state.resumed_from, "timing_summary": timing_summary(log.history),
    }
    meta = RewardMeta(score_mean=mean, score_std=std, max_seq_len=rw.max_seq_len, prompt_format=settings.prompt_format,
                      eval_accuracy=metrics["eval_accuracy"])

    def write(folder: str) -> None:
        skeleton = merge_lora(load_into_skeleton(_build(settings, tokenizer, for_export=True), weights))
        save_reward_model(skeleton, tokenizer, os.path.join(folder, MODEL), meta,
                          card=model_card("Reward model", base_name(settings.reward_model), metrics=metrics,
                                          meta=CardMeta(task=("text-classification", "Preference ranking"),
                                                        base_model=hub_base(settings.reward_model),
                                                        datasets=hub_datasets(ctx.upstream[DATA].config),
                                                        tags=("reward-model",),
                                                        results={"eval_accuracy": ("accuracy", "held-out pair accuracy")})))
        log.export(os.path.join(folder, LOGS), f"Reward model {ctx.key[:8]}")

    manifest = ctx.write_output(write, metrics)
    log.close()
    return manifest


def _build(settings: RewardSettings, tokenizer, ds_config: dict | None = None, for_export: bool = False):
    """The reward model to train (``ds_config``: partitioned as it loads under ZeRO-3) or, for export, a whole one."""
    rw = settings.reward
    model = build_reward_model(settings.reward_model, tokenizer, dropout=rw.dropout, partition_with=ds_config)
    return for_training(model, rw.lora, rw.gradient_checkpointing and not for_export)
