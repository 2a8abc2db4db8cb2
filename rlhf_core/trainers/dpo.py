"""Step 3 with ``rl.algorithm: dpo``: offline preference optimisation of the SFT actor on the reward split's
pairs (the data stage's ``reward/train``; ``reward/eval`` for evaluation), against the frozen SFT model as
reference (with LoRA and frozen base weights, the actor with its adapters off). No rollouts, no reward model.

One optimizer step (Rafailov et al. 2023; ``rlhf_core/maths/preference.py`` for DPO, cDPO, IPO and SimPO)::

    1 log-probs      each pair's chosen and rejected answer under the actor and (no gradient) the reference
    2 loss           the preference loss + ptx_coef * pretraining loss; backward, step (the shared loop)
    3 EMA update; metrics (preference accuracy, margin); checkpoint

It runs on the loop SFT and the reward model use (``rlhf_core/trainers/loop.py``): rl.train_micro_batch_size
pairs per process per micro-batch, rl.dpo.gradient_accumulation_steps per step, rl.epochs or rl.max_steps,
exact resume (weights, optimizer, position, RNG, EMA).
"""

from __future__ import annotations

import time

import torch

from rlhf_core.config import RLConfig, TrainStageConfig
from rlhf_core.config.views import RLSettings
from rlhf_core.data.formats import render_answer, render_prompt
from rlhf_core.data.prepare import load_split
from rlhf_core.data.ptx import PtxSchedule, load_blocks
from rlhf_core.engines.training import build_ds_config, initialize
from rlhf_core.maths.algos import logprobs_from_logits
from rlhf_core.maths.preference import NEEDS_REFERENCE, PREFERENCE_LOSSES, PairLogps, PreferenceLoss, answer_logps
from rlhf_core.models.causal_lm import load_causal_lm
from rlhf_core.models.lora import for_training
from rlhf_core.models.tokenizers import load_saved_tokenizer
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import DATA, MODEL, REWARD, SFT
from rlhf_core.storage.store import Manifest
from rlhf_core.trainers.experience import build_ema, build_reference
from rlhf_core.trainers.loop import LoopSpec, plan_steps, run_loop
from rlhf_core.trainers.metrics import timing_summary
from rlhf_core.trainers.rl import save_actors
from rlhf_core.trainers.sft import IGNORE, Example, collate, token_loss_sum, tokenize_pairs
from rlhf_core.trainers.state import gather_state_dict

Pair = tuple[Example, Example]  # (chosen, rejected): prompt + answer + EOS, labels on the answer only


def loop_config(rl: RLConfig) -> TrainStageConfig:
    """The shared loop's settings, from step 3's (what DPO reads of rl: batch, epochs, steps, checkpoints, the
    actor's optimizer, DeepSpeed, LoRA, dropout)."""
    return TrainStageConfig(
        epochs=rl.epochs, max_steps=rl.max_steps, micro_batch_size=rl.train_micro_batch_size,
        gradient_accumulation_steps=rl.dpo.gradient_accumulation_steps, max_seq_len=rl.dpo.max_seq_len,
        checkpoint_every=rl.checkpoint_every, eval_every=rl.dpo.eval_every, log_every=rl.log_every,
        gradient_checkpointing=rl.actor.gradient_checkpointing, dropout=rl.actor.dropout, seed=rl.seed,
        optimizer=rl.actor.optimizer, deepspeed=rl.actor.deepspeed, lora=rl.actor.lora)


def preference_pairs(ctx: StageContext, split: str, tokenizer) -> tuple[list[Pair], int]:
    """The reward split's pairs in actor tokens; returns them and how many were dropped (a prompt that fills
    rl.dpo.max_seq_len leaves no answer token)."""
    settings: RLSettings = ctx.settings
    ds = load_split(ctx.store, ctx.upstream[DATA], f"{REWARD}/{split}")
    fmt, max_len = settings.prompt_format, settings.rl.dpo.max_seq_len
    prompts = [render_prompt(p, fmt, tokenizer) for p in ds["prompt"]]
    # A pair is dropped only for its prompt's length, so chosen and rejected drop together and stay aligned.
    chosen, dropped = tokenize_pairs(prompts, [render_answer(a, fmt) for a in ds["chosen"]], tokenizer, max_len, True)
    rejected, _ = tokenize_pairs(prompts, [render_answer(a, fmt) for a in ds["rejected"]], tokenizer, max_len, True)
    assert len(chosen) == len(rejected)
    if settings.rl.dpo.invert_preferences:  # the ablation control
        chosen, rejected = rejected, chosen
    return list(zip(chosen, rejected)), dropped


def pair_logps(model, pairs: list[Pair], pad_id: int, device: torch.device) -> PairLogps:
    """Summed log-probs of each pair's chosen and rejected answer under ``model`` (one forward of 2B rows)."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logprobs = logprobs_from_logits(logits[:, :-1], batch["input_ids"][:, 1:])
    sums, counts = answer_logps(logprobs, batch["labels"][:, 1:] != IGNORE)
    B = len(pairs)
    return PairLogps(sums[:B], sums[B:], counts[:B], counts[B:])


def train_dpo(ctx: StageContext) -> Manifest | None:
    settings: RLSettings = ctx.settings
    rl, dpo, dist = settings.rl, settings.rl.dpo, ctx.dist
    torch.manual_seed(rl.seed)
    sft_path = ctx.fetch(SFT, MODEL)
    tokenizer = load_saved_tokenizer(sft_path, padding_side="left")
    train, dropped = preference_pairs(ctx, "train", tokenizer)
    evals, _ = preference_pairs(ctx, "eval", tokenizer)
    if not train or not evals:
        raise ValueError(f"rl.algorithm dpo learns from the reward split's pairs, but reward/train has {len(train)} and "
                         f"reward/eval {len(evals)} usable pairs; give the reward step a share of data.split (or "
                         "sources with rejected answers), or raise rl.dpo.max_seq_len")
    cfg = loop_config(rl)
    _, total_steps = plan_steps(cfg, len(train), dist.world_size)
    ds_config = build_ds_config(rl.actor.deepspeed, rl.actor.optimizer, cfg.micro_batch_size,
                                cfg.gradient_accumulation_steps, dist.world_size)
    actor = for_training(load_causal_lm(sft_path, dropout=rl.actor.dropout, what="the SFT actor",
                                        partition_with=ds_config), rl.actor.lora, rl.actor.gradient_checkpointing)
    engine = initialize(actor, ds_config, rl.actor.optimizer, total_steps)
    ref = None
    if NEEDS_REFERENCE[dpo.loss_type]:
        ref, _ = build_reference(sft_path, rl, engine, rl.offload_reference, dist)
    ema = build_ema(settings.ema, engine, ctx.is_main)
    ptx = None
    if settings.ptx is not None:
        blocks = load_blocks(ctx.store, ctx.upstream[DATA], tokenizer, settings.ptx.block_tokens, settings.ptx.max_blocks)
        ptx = PtxSchedule(blocks, settings.mixture.ptx_batch_size, dist.rank, dist.world_size, rl.seed + 1)
    loss_fn, pad = PREFERENCE_LOSSES[dpo.loss_type], tokenizer.pad_token_id
    ctx.log(f"dpo ({dpo.loss_type}, beta {dpo.beta}): {len(train)} pairs ({dropped} dropped), reference "
            f"{'none' if ref is None else type(ref).__name__}, EMA {'yes' if ema else 'no'}")

    def losses(pairs: list[Pair]) -> PreferenceLoss:
        policy = pair_logps(engine, pairs, pad, dist.device)
        reference = None
        if ref is not None:
            with torch.no_grad():
                reference = pair_logps(ref, pairs, pad, dist.device)
        return loss_fn(policy, reference, dpo.beta, dpo.label_smoothing, dpo.simpo_gamma)

    def step(rows: list[int], window_units: float, micro_index: int):
        out = losses([train[i] for i in rows])
        scale = dist.world_size * cfg.gradient_accumulation_steps / window_units  # the exact mean over the window
        loss = out.losses.sum() * scale
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {"sum/loss": out.losses.sum().detach(), "sum/accuracy": (margin > 0).sum(),
                   "sum/margin": margin.sum(), "sum/chosen_reward": out.chosen_rewards.sum(),
                   "sum/rejected_reward": out.rejected_rewards.sum()}
        if ptx is not None:
            ids = ptx.batch(micro_index).to(dist.device)
            s, k = token_loss_sum(engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids)
            loss = loss + settings.mixture.ptx_coef * s / k
            metrics["sum/ptx_loss"] = (s / k).detach() / scale
        return loss, metrics

    def evaluate() -> dict[str, float]:
        return evaluate_pairs(engine, losses, evals, cfg.micro_batch_size, dist.rank, dist.world_size, dist.device)

    spec = LoopSpec(cfg, len(train), len, step, evaluate,
                    after_step=(lambda: ema.update(engine.module)) if ema is not None else None,
                    extra_state=(lambda: {"ema": ema.state_dict()} if ctx.is_main else {}) if ema is not None else None,
                    load_extra=(lambda extra: ema.load_state_dict(extra["ema"])) if ema is not None else None)
    t0 = time.perf_counter()
    log, state = run_loop(ctx, engine, spec)
    train_s = time.perf_counter() - t0
    actor_state = gather_state_dict(engine)
    if not ctx.is_main:
        return None
    first = next(r for r in log.history if "eval/accuracy" in r)
    metrics = {
        "algorithm": "dpo", "loss_type": dpo.loss_type,
        "eval_accuracy_before": first["eval/accuracy"], "eval_accuracy": log.last("eval/accuracy"),
        "eval_margin": log.last("eval/margin"), "eval_loss": log.last("eval/loss"), "train_loss": log.last("loss"),
        "steps": state.global_step, "train_pairs": len(train), "dropped_pairs": dropped,
        "train_seconds": round(train_s, 2), "resumed_from": state.resumed_from, "timing_summary": timing_summary(log.history),
    }
    return save_actors(ctx, actor_state, ema, tokenizer, log, metrics)


@torch.no_grad()
def evaluate_pairs(engine, losses, pairs: list[Pair], micro: int, rank: int, world: int,
                   device: torch.device) -> dict[str, float]:
    """Held-out preference loss, accuracy (the implicit reward ranks chosen above rejected) and mean margin,
    sharded over ranks (a rank with fewer pairs joins every forward, weighted 0)."""
    engine.eval()
    mine = pairs[rank::world]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, margin, n
    for i in range(0, max(len(mine), 1), micro):
        chunk = mine[i:i + micro] or pairs[:1]
        weight = 1.0 if mine[i:i + micro] else 0.0
        out = losses(chunk)
        margin = (out.chosen_rewards - out.rejected_rewards).double()
        sums += weight * torch.stack([out.losses.double().sum(), (margin > 0).double().sum(), margin.sum(),
                                      torch.tensor(float(len(chunk)), dtype=torch.float64, device=device)])
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(sums)
    n = sums[3].clamp(min=1)
    return {"loss": (sums[0] / n).item(), "accuracy": (sums[1] / n).item(), "margin": (sums[2] / n).item()}
