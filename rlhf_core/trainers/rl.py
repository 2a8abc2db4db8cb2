"""Step 3: the actor trained against its reward by ``rl.algorithm``, with a frozen reference, a KL penalty (or
KL loss), an EMA of the actor and an optional pretraining-loss mixture. PPO (DeepSpeed-Chat's) adds a critic
initialised from the reward model; GRPO, RLOO and REINFORCE++ sample ``n`` answers per prompt and need no
critic; DPO learns offline from preference pairs (``rlhf_core/trainers/dpo.py``).

One step (Ouyang et al. 2022, sec. 3.5; DeepSpeed-Chat's step 3; OpenRLHF's and veRL's critic-free variants)::

    1 generate rollouts            hybrid engine; each prompt n times (rl.n_samples_per_prompt)
    2 score                        old / reference log-probs, critic values (PPO), reward-model and rule scores
    3 KL-shaped rewards            r_t = -beta * kl_t (unless KL is a loss term), the score on the last token
    4 advantages and returns       the algorithm's estimator: GAE, or a group baseline and returns;
                                   whitened over all ranks (PPO, REINFORCE++)
    5 minibatch updates            actor: policy loss + kl_coef * KL loss + ptx_coef * ptx loss; critic: value loss
    6 EMA update (after each actor step); metrics; checkpoint
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import torch

from rlhf_core.data.batches import epoch_batches
from rlhf_core.config import RLConfig
from rlhf_core.config.schema import ALGORITHM_NAMES
from rlhf_core.config.views import RLSettings
from rlhf_core.data.prepare import load_split
from rlhf_core.data.ptx import PtxSchedule, load_blocks
from rlhf_core.engines.hybrid import HybridEngine, left_pad
from rlhf_core.engines.training import check_finite_grad_norm
from rlhf_core.maths.algos import (POLICY_LOSSES, KLController, compute_kl_loss, compute_value_loss, masked_mean,
                                   masked_mean_var, masked_whiten)
from rlhf_core.models.card import model_card
from rlhf_core.models.causal_lm import load_causal_lm, save_causal_lm
from rlhf_core.models.loading import torch_dtype
from rlhf_core.models.lora import apply_lora, merge_lora
from rlhf_core.models.reward_model import load_reward_model, save_reward_model
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import ACTOR, ACTOR_EMA, CRITIC, DATA, LOGS, MODEL, RL, REWARD, SFT
from rlhf_core.storage.store import Manifest
from rlhf_core.models.reward_function import RewardFunction
from rlhf_core.trainers.experience import (Experience, Models, RewardScorer, answer_texts, build_models, gold_function,
                                           make_experience, sequence_logprobs, sequence_values, tokenize_prompts)
from rlhf_core.trainers.metrics import MetricsLog, Progress, Timer, timing_summary
from rlhf_core.trainers.sft import token_loss_sum
from rlhf_core.trainers.state import (TrainState, all_reduce_sum, gather_state_dict, load_into_skeleton,
                                      maybe_inject_fault, resume, save_checkpoint)


# ---------------------------------------------------------------------------------------------- updates


def update(m: Models, exp: Experience, settings: RLSettings, step: int, ptx: PtxSchedule | None,
           timer: Timer, kl_coef: float | None = None) -> dict[str, float]:
    """Phase 5 (and 6's EMA): ppo_epochs passes over the experience in micro-batches; each micro-batch is
    one actor step and (PPO) one critic step. The i-th actor update of the run draws ptx batch i. ``kl_coef``
    (default rl.kl.coef; the KL controller's current value) weighs the KL loss when rl.kl.use_kl_loss."""
    rl = settings.rl
    kl_coef = rl.kl.coef if kl_coef is None else kl_coef
    policy_loss_fn = POLICY_LOSSES[rl.policy_loss]
    agg, max_len = rl.loss_agg_mode, rl.generation.max_answer_len
    temperature = rl.generation.logprob_temperature
    n, micro, P = exp.sequences.shape[0], rl.train_micro_batch_size, exp.prompt_len
    updates_per_step = rl.ppo_epochs * math.ceil(n / micro)
    sums: dict[str, float] = {}
    count = 0
    with timer("train"):
        for ppo_epoch in range(rl.ppo_epochs):
            g = torch.Generator().manual_seed(rl.seed * 7919 + step * 31 + ppo_epoch)
            order = torch.randperm(n, generator=g).to(exp.sequences.device)
            for start in range(0, n, micro):
                batch = exp.select(order[start:start + micro])
                m.actor.train()
                with timer("train/actor_forward_backward"):
                    logprobs = sequence_logprobs(m.actor, batch.sequences, batch.attention_mask, P, temperature)
                    policy_loss, pm = policy_loss_fn(logprobs, batch.old_logprobs, batch.advantages,
                                                     batch.response_mask, rl.clip_range, agg, max_len)
                    kl_loss = torch.zeros((), device=logprobs.device)
                    if rl.kl.use_kl_loss:
                        kl_loss = compute_kl_loss(logprobs, batch.ref_logprobs, batch.response_mask, rl.kl.estimator,
                                                  agg, max_len)
                    ptx_loss = torch.zeros((), device=logprobs.device)
                    if ptx is not None:
                        ids = ptx.batch(step * updates_per_step + count).to(logprobs.device)
                        logits = m.actor(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                        s, k = token_loss_sum(logits, ids)
                        ptx_loss = s / k
                    actor_loss = policy_loss + kl_coef * kl_loss + settings.mixture.ptx_coef * ptx_loss
                    m.actor.backward(actor_loss)
                with timer("train/actor_step"):
                    m.actor.step()
                    check_finite_grad_norm(m.actor, "rl actor")
                if m.ema is not None:
                    with timer("ema"):
                        m.ema.update(m.actor.module)

                losses = {"rl/policy_loss": policy_loss, "rl/ptx_loss": ptx_loss, "rl/clipfrac": pm["clipfrac"],
                          "rl/approx_kl": pm["approx_kl"]}
                if rl.kl.use_kl_loss:
                    losses["rl/kl_loss"] = kl_loss
                if m.critic is not None:
                    losses.update(update_critic(m.critic, batch, rl, P, timer))
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
    return {k: v / count for k, v in sums.items()}


def update_critic(critic, batch: Experience, rl: RLConfig, prompt_len: int, timer: Timer) -> dict[str, torch.Tensor]:
    """PPO's critic step on one micro-batch: the clipped value loss against the returns."""
    critic.train()
    with timer("train/critic_forward_backward"):
        values = sequence_values(critic, batch.sequences, batch.attention_mask, prompt_len).float()
        value_loss, vm = compute_value_loss(values, batch.values, batch.returns, batch.response_mask,
                                            rl.clip_range_value)
        critic.backward(value_loss)
    with timer("train/critic_step"):
        critic.step()
        check_finite_grad_norm(critic, "rl critic")
    return {"rl/value_loss": value_loss, "rl/value_clipfrac": vm["value_clipfrac"]}


# ------------------------------------------------------------------------------------------------- loop


def check_lengths(settings: RLSettings, prompt_ids: list[list[int]], max_positions: int | None) -> None:
    """Refuse prompts that leave the actor no room for an answer (before any generation)."""
    longest = max(map(len, prompt_ids))
    if longest > settings.max_prompt_tokens:
        raise ValueError(f"a PPO prompt has {longest} actor tokens, more than data.max_prompt_tokens "
                         f"({settings.max_prompt_tokens}); the data stage drops such prompts, so re-run it")
    answer = settings.rl.generation.max_answer_len
    if max_positions is not None and longest + answer > max_positions:
        raise ValueError(f"prompts of up to {longest} tokens + rl.generation.max_answer_len {answer} exceed the "
                         f"actor's {max_positions} positions: no room for an answer; lower data.max_prompt_tokens "
                         "or rl.generation.max_answer_len")


def plan(rl: RLConfig, n_prompts: int, world: int) -> tuple[int, int]:
    """(PPO steps per epoch, total PPO steps)."""
    per_epoch = len(epoch_batches(n_prompts, rl.rollout_batch_size, world, rl.seed, 0)) // rl.generation_batches
    if per_epoch == 0:
        raise ValueError(
            f"{n_prompts} PPO prompts are fewer than one step needs (rollout_batch_size {rl.rollout_batch_size} x "
            f"generation_batches {rl.generation_batches} x {world} processes); lower them or add prompts"
        )
    total = per_epoch * rl.epochs
    return per_epoch, min(total, rl.max_steps) if rl.max_steps else total


def train_rl(ctx: StageContext) -> Manifest | None:
    settings: RLSettings = ctx.settings
    if settings.rl.algorithm == "dpo":  # offline: no rollouts, its own loop
        from rlhf_core.trainers.dpo import train_dpo

        return train_dpo(ctx)
    rl, dist = settings.rl, ctx.dist
    torch.manual_seed(rl.seed)
    prompts = list(load_split(ctx.store, ctx.upstream[DATA], f"{RL}/train")["prompt"])
    per_epoch, total = plan(rl, len(prompts), dist.world_size)
    rows_per_step = rl.rows_per_step
    total_updates = total * rl.ppo_epochs * math.ceil(rows_per_step / rl.train_micro_batch_size)
    m = build_models(ctx, total_updates)
    prompt_ids = tokenize_prompts(prompts, m.actor_tok, settings.prompt_format)
    check_lengths(settings, prompt_ids, getattr(m.actor.module.config, "max_position_embeddings", None))
    scorer = None
    if m.reward is not None:
        scorer = RewardScorer(m.reward, m.reward_tok, m.actor_tok, settings.prompt_format, m.reward_meta.max_seq_len,
                              dist.device)
    function = RewardFunction(settings.reward.function, "reward.function") if settings.reward.function else None
    gold = gold_function(settings.gold_reward)
    hybrid = HybridEngine(m.actor, m.actor_tok, rl.generation, settings.hybrid_engine, dist.world_size, log=ctx.log)
    kl_ctl = KLController(rl.kl.coef, rl.kl.adaptive, rl.kl.target, rl.kl.horizon)
    n = rl.n_samples_per_prompt
    ctx.log(f"{rl.algorithm}: {len(prompts)} prompts, {per_epoch} steps/epoch, {total} steps; {rows_per_step} answers/"
            f"step/process ({n} per prompt), {total_updates} optimizer updates; critic "
            f"{'yes' if m.critic is not None else 'none'}; reward: "
            + " + ".join(([f"reward model (tokenizer {'shared' if scorer.same else 'differs: text round trip'})"]
                          if scorer else []) + ([f"{settings.reward.function_weight} x {function.spec}"] if function else [])))

    engines = {"actor": m.actor, **({"critic": m.critic} if m.critic is not None else {})}
    state, log = resume(ctx, engines)
    if state.resumed_from:
        kl_ctl.load_state_dict(state.extra["kl"])
        if m.ema is not None and ctx.is_main:  # the EMA lives on rank 0 only
            m.ema.load_state_dict(state.extra["ema"])
    ptx = None
    if settings.ptx is not None:
        blocks = load_blocks(ctx.store, ctx.upstream[DATA], m.actor_tok, settings.ptx.block_tokens,
                             settings.ptx.max_blocks)
        ptx = PtxSchedule(blocks, settings.mixture.ptx_batch_size, dist.rank, dist.world_size, rl.seed + 1)
    step, epoch, pos = state.global_step, state.epoch, state.pos
    progress = Progress(ctx.stage, total, initial=step, enabled=ctx.is_main)
    t_start = time.perf_counter()
    paths: dict[str, int] = {}  # rollouts per generation path (fast decoder, transformers): for the manifest

    while step < total:
        schedule = epoch_batches(len(prompts), rl.rollout_batch_size, dist.world_size, rl.seed, epoch)
        if pos >= per_epoch:
            epoch, pos = epoch + 1, 0
            continue
        timer = Timer(dist.device)
        t_step = time.perf_counter()
        experiences, scores, golds = [], [], []
        for g in range(rl.generation_batches):
            # each prompt n times in a row: a group of n answers, never split between batches or ranks
            rows = [i for i in schedule[pos * rl.generation_batches + g][dist.rank] for _ in range(n)]
            ids, mask = left_pad([prompt_ids[i] for i in rows], m.actor_tok.pad_token_id, dist.device)
            with timer("generate"):  # 1 generate rollouts
                rollout = hybrid.generate(ids, mask, timer=timer)
            paths[hybrid.path] = paths.get(hybrid.path, 0) + 1
            texts = [prompts[i] for i in rows]
            exp, score = make_experience(m, scorer, rollout, texts, rl, kl_ctl.value, timer, function,  # 2-4
                                         settings.reward.function_weight)
            experiences.append(exp)
            scores.append(score)
            if gold is not None:
                golds += gold(texts, answer_texts(rollout, m.actor_tok))
        exp = Experience.cat(experiences)
        if rl.whiten:  # 4 whiten over all ranks (PPO; REINFORCE++'s global batch normalisation)
            stats = masked_mean_var(exp.advantages, exp.response_mask, across_ranks=True)
            exp = Experience(**{**exp.__dict__, "advantages": masked_whiten(exp.advantages, exp.response_mask,
                                                                           stats=stats)})
        train_metrics = update(m, exp, settings, step, ptx, timer, kl_ctl.value)  # 5 (and 6's EMA)

        kl_per_seq = (exp.kl * exp.response_mask).sum(1)
        answer_len = exp.response_mask.sum(1)
        answers = exp.sequences[:, exp.prompt_len:]
        finished = ((answers == m.actor_tok.eos_token_id) & exp.response_mask.bool()).any(1)
        row = {
            **train_metrics,
            "reward/score": torch.cat([s.raw for s in scores]).mean().item(),
            "reward/shaped_return": exp.rewards.sum(1).mean().item(),
            "kl/mean": kl_per_seq.mean().item(), "kl/coef": kl_ctl.value,
            "gen/answer_len": answer_len.mean().item(),
            "gen/eos_rate": finished.float().mean().item(),
            "lr/actor": m.actor.get_lr()[0],
            **{f"timing/{k}": v for k, v in timer.times.items()}, "timing/step": time.perf_counter() - t_step,
        }
        if scorer is not None and function is not None:  # the two parts of the score
            row["reward/model"] = torch.cat([s.model for s in scores]).mean().item()
            row["reward/function"] = torch.cat([s.function for s in scores]).mean().item()
        if m.critic is not None:
            row.update({"critic/value_mean": masked_mean(exp.values, exp.response_mask).item(),
                        "lr/critic": m.critic.get_lr()[0]})
        if golds:
            row["gold/reward"] = sum(golds) / len(golds)
        row = {k: v / dist.world_size for k, v in all_reduce_sum(row).items() if not math.isnan(v)}
        kl_ctl.update(row["kl/mean"], rows_per_step * dist.world_size)  # 6 metrics, KL controller
        step, pos = step + 1, pos + 1
        if step % rl.log_every == 0 or step == total:
            log.log(step, row)
        progress.update(1, reward=row["reward/score"], kl=row["kl/mean"])
        if step % rl.checkpoint_every == 0 and step < total:
            state.global_step, state.epoch, state.pos = step, epoch, pos
            state.extra = {"kl": kl_ctl.state_dict(), **({"ema": m.ema.state_dict()} if m.ema and ctx.is_main else {})}
            save_checkpoint(ctx, engines, state)
        maybe_inject_fault(ctx.stage, step)
    progress.close()
    return _save(ctx, m, log, state, time.perf_counter() - t_start, paths)


def _save(ctx: StageContext, m: Models, log: MetricsLog, state: TrainState, train_s: float,
          paths: dict[str, int]) -> Manifest | None:
    settings: RLSettings = ctx.settings
    actor_state = gather_state_dict(m.actor)
    critic_state = gather_state_dict(m.critic) if m.critic is not None else None
    if not ctx.is_main:
        return None
    tail = log.history[-max(1, len(log.history) // 10):]  # the last tenth of training
    metrics: dict[str, Any] = {
        "algorithm": settings.rl.algorithm,
        "steps": max((r["step"] for r in log.history), default=0),
        "reward_first": log.history[0].get("reward/score") if log.history else None,
        "reward_last": sum(r["reward/score"] for r in tail) / len(tail),
        "kl_last": sum(r["kl/mean"] for r in tail) / len(tail),
        "train_seconds": round(train_s, 2), "resumed_from": state.resumed_from, "timing_summary": timing_summary(log.history),
        "generation_path": "+".join(sorted(paths)) or None, "generation_rollouts": paths,
    }
    if "gold/reward" in log.history[0]:
        metrics.update(gold_first=log.history[0]["gold/reward"], gold_last=sum(r["gold/reward"] for r in tail) / len(tail))

    def write_critic(folder: str) -> None:
        critic_dtype = torch_dtype(settings.rl.critic.deepspeed.precision)
        skeleton = apply_lora(load_reward_model(ctx.fetch(REWARD, MODEL)), settings.rl.critic.lora)
        critic = merge_lora(load_into_skeleton(skeleton, critic_state))
        save_reward_model(critic.to(critic_dtype), m.reward_tok, os.path.join(folder, CRITIC), m.reward_meta)

    return save_actors(ctx, actor_state, m.ema, m.actor_tok, log, metrics, write_critic if critic_state else None)


def save_actors(ctx: StageContext, actor_state: dict[str, torch.Tensor], ema, actor_tok, log: MetricsLog,
                metrics: dict[str, Any], write_more: Callable[[str], None] | None = None) -> Manifest:
    """Step 3's output (rank 0): the final actor and its EMA (LoRA merged, in the precision the actor trained in;
    the EMA, averaged in fp32, in the actor's too), what ``write_more`` adds (PPO's critic), the logs; then the
    manifest."""
    settings: RLSettings = ctx.settings
    name = ALGORITHM_NAMES[settings.rl.algorithm]
    sft_path = ctx.fetch(SFT, MODEL)
    base = f"SFT output (content {ctx.upstream[SFT].content_id[:12]})"
    actor_dtype = torch_dtype(settings.rl.actor.deepspeed.precision)

    def actor_skeleton():
        return apply_lora(load_causal_lm(sft_path, what="the SFT actor"), settings.rl.actor.lora)

    def write(folder: str) -> None:
        save_causal_lm(load_into_skeleton(actor_skeleton(), actor_state), actor_tok, os.path.join(folder, ACTOR),
                       dtype=actor_dtype, card=model_card(f"{name} actor (final)", base, metrics=metrics))
        if ema is not None:
            skeleton = actor_skeleton()
            save_causal_lm(load_into_skeleton(skeleton, ema.full_state_dict(skeleton)), actor_tok,
                           os.path.join(folder, ACTOR_EMA), dtype=actor_dtype,
                           card=model_card(f"{name} actor (EMA, beta {settings.ema.beta})", base, metrics=metrics))
        if write_more is not None:
            write_more(folder)
        log.export(os.path.join(folder, LOGS), f"{name} {ctx.key[:8]}")

    manifest = ctx.write_output(write, metrics)
    log.close()
    return manifest

