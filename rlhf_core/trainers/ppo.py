"""Step 3: PPO of the actor against the reward model, with a frozen reference, a critic initialised from
the reward model, a KL penalty, an EMA of the actor and an optional pretraining-loss mixture.

One PPO step (Ouyang et al. 2022, sec. 3.5; DeepSpeed-Chat's step 3)::

    1 generate rollouts            hybrid engine
    2 score                        old / reference log-probs, critic values, reward-model scores
    3 KL-shaped rewards            r_t = -beta * kl_t, score on the last answer token
    4 advantages and returns       GAE, whitened over all ranks
    5 minibatch updates            actor: policy loss + ptx_coef * ptx loss;  critic: value loss
    6 EMA update (after each actor step); metrics; checkpoint
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from rlhf_core.stages import registry as stages
from rlhf_core.config import DeepSpeedConfig, PipelineConfig
from rlhf_core.data.prepare import load_split
from rlhf_core.trainers.ema import EMA
from rlhf_core.data.ptx import PtxSchedule, load_blocks
from rlhf_core.engines.training import build_ds_config, check_finite_grad_norm, frozen_config, frozen_engine, initialize
from rlhf_core.trainers.experience import (Experience, RewardScorer, sequence_logprobs, sequence_values, tokenize_prompts)
from rlhf_core.engines.hybrid import HybridEngine, left_pad
from rlhf_core.trainers.metrics import MetricsLog, Progress
from rlhf_core.models.causal_lm import load_causal_lm, save_causal_lm
from rlhf_core.models.lora import apply_lora, for_training, merge_lora
from rlhf_core.models.reward_model import load_reward_model, reward_meta, save_reward_model
from rlhf_core.models.tokenizers import load_saved_tokenizer
from rlhf_core.maths.rl import (KLController, compute_gae, compute_policy_loss, compute_rewards, compute_value_loss,
                                masked_mean, masked_whiten)
from rlhf_core.storage.store import Manifest
from rlhf_core.trainers.state import (StageContext, all_reduce_sum, epoch_batches, gather_state_dict,
                                       load_checkpoint, load_into_skeleton, maybe_inject_fault, put_logs,
                                       save_checkpoint)
from rlhf_core.trainers.sft import _card, token_loss_sum

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ set-up


@dataclass
class Models:
    actor: Any  # DeepSpeed engine
    critic: Any  # DeepSpeed engine
    ref: torch.nn.Module
    reward: torch.nn.Module
    ema: EMA | None
    actor_tok: Any
    reward_tok: Any
    ref_offloaded: bool = False  # moved whole to the accelerator per phase (not when ZeRO-3 partitions it)
    reward_offloaded: bool = False


def _path(ctx: StageContext, stage: str) -> str:
    m = ctx.upstream[stage]
    return ctx.store.fetch(m.stage, m.key, "model")


def build_models(ctx: StageContext, total_updates: int) -> Models:
    cfg, ppo, dist = ctx.cfg, ctx.cfg.ppo, ctx.dist
    sft_path, reward_path = _path(ctx, stages.SFT), _path(ctx, stages.REWARD)
    actor_tok = load_saved_tokenizer(sft_path, padding_side="left")
    reward_tok = load_saved_tokenizer(reward_path, padding_side="right")
    micro = ppo.train_micro_batch_size

    # Under ZeRO-3 every model is partitioned across the ranks as it loads, so no rank holds a whole copy.
    actor_ds = build_ds_config(ppo.actor.deepspeed, ppo.actor.optimizer, micro, 1, dist.world_size)
    actor = for_training(load_causal_lm(sft_path, dropout=ppo.actor.dropout, what="the SFT actor",
                                        partition_with=actor_ds), ppo.actor.lora, ppo.actor.gradient_checkpointing)
    actor_engine = initialize(actor, actor_ds, ppo.actor.optimizer, total_updates)

    critic_ds = build_ds_config(ppo.critic.deepspeed, ppo.critic.optimizer, micro, 1, dist.world_size)
    critic = for_training(load_reward_model(reward_path, dropout=ppo.critic.dropout, partition_with=critic_ds),
                          ppo.critic.lora, ppo.critic.gradient_checkpointing)
    critic_engine = initialize(critic, critic_ds, ppo.critic.optimizer, total_updates)

    ref, ref_offloaded = _frozen(
        lambda dtype, ds: load_causal_lm(sft_path, dtype=dtype, dropout=0.0, what="the reference (SFT) model",
                                         partition_with=ds),
        ppo.actor.deepspeed, ppo.offload_reference, micro, dist)
    reward, reward_offloaded = _frozen(
        lambda dtype, ds: load_reward_model(reward_path, dtype=dtype, dropout=0.0, partition_with=ds),
        ppo.critic.deepspeed, ppo.offload_reward, micro, dist)
    ema = None
    if cfg.ema.enabled:
        ema = EMA(actor_engine.module, cfg.ema.beta, actor_engine.zero_optimization_stage() == 3, ctx.is_main,
                  on_cpu=cfg.ema.on_cpu)
    return Models(actor_engine, critic_engine, ref, reward, ema, actor_tok, reward_tok, ref_offloaded, reward_offloaded)


def _frozen(load: Callable[[torch.dtype, dict | None], torch.nn.Module], trainee: DeepSpeedConfig, offload: bool,
            micro: int, dist) -> tuple[torch.nn.Module, bool]:
    """A frozen model (reference, reward) set up like its trainee (actor, critic): beside a ZeRO-3 trainee a
    ZeRO-3 inference engine, partitioned as it loads (``offload`` keeps the partitions in host memory); else a
    whole copy on the accelerator, or in host memory between phases when ``offload``. Returns the model and
    whether ``on_device`` must move it."""
    dtype = _DTYPES[trainee.precision]
    if trainee.zero_stage == 3:
        ds = frozen_config(trainee.precision, offload, micro, dist.world_size)
        return frozen_engine(load(dtype, ds), ds), False
    model = load(dtype, None).requires_grad_(False).eval()
    return model.to("cpu" if offload else dist.device), offload


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device, offloaded: bool) -> Iterator[torch.nn.Module]:
    """Bring an offloaded frozen model to the accelerator for one phase, then back to host memory."""
    if not offloaded or device.type == "cpu":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


class Timer:
    """Wall time per named phase (device-synchronised), for ``timing/*`` metrics."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host-device sync: only for honest phase timings


# ------------------------------------------------------------------------------------------- experience


def make_experience(m: Models, scorer: RewardScorer, rollout, prompts: list[str], cfg: PipelineConfig,
                    kl_coef: float, score_stats: tuple[float, float], timer: Timer) -> tuple[Experience, dict]:
    """Phases 2-4 for one generation batch: score, shape rewards, advantages (not yet whitened)."""
    ppo, device = cfg.ppo, rollout.sequences.device
    temperature = ppo.generation.temperature if ppo.generation.do_sample else 1.0
    seq, att, P = rollout.sequences, rollout.attention_mask, rollout.prompt_len
    mask = rollout.response_mask.float()
    chunk = ppo.train_micro_batch_size  # rows per scoring forward: bounds the [rows, A, vocab] logits
    with timer("score"), torch.no_grad():
        m.actor.eval()
        old_logprobs = sequence_logprobs(m.actor, seq, att, P, temperature, chunk)
        with on_device(m.ref, device, m.ref_offloaded) as ref:
            ref_logprobs = sequence_logprobs(ref, seq, att, P, temperature, chunk)
        m.critic.eval()
        values = sequence_values(m.critic, seq, att, P, chunk).float()
        with on_device(m.reward, device, m.reward_offloaded):
            raw = scorer(prompts, rollout)
    scores = raw
    if ppo.normalize_reward:
        mean, std = score_stats
        scores = (scores - mean) / max(std, 1e-6)
    scores = scores * ppo.reward_scale
    with timer("advantages"):
        rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, ppo.kl.estimator,
                                      clip=ppo.reward_clip)
        advantages, returns = compute_gae(rewards, values, mask, ppo.gamma, ppo.lam)
    exp = Experience(seq, att, mask, old_logprobs, ref_logprobs, values, scores, rewards, kl, advantages, returns, P)
    return exp, {"raw_scores": raw}


def _global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and variance over every rank's experience (one all-reduce)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    s, ss, n = stats
    mean = s / n.clamp(min=1)
    return mean.to(x.dtype), (ss / n.clamp(min=1) - mean * mean).clamp(min=0).to(x.dtype)


# ---------------------------------------------------------------------------------------------- updates


def update(m: Models, exp: Experience, cfg: PipelineConfig, step: int, ptx: PtxSchedule | None,
           timer: Timer) -> dict[str, float]:
    """Phase 5 (and 6's EMA): ppo_epochs passes over the experience in micro-batches; each micro-batch is
    one actor step and one critic step. The i-th actor update of the run draws ptx batch i."""
    ppo = cfg.ppo
    temperature = ppo.generation.temperature if ppo.generation.do_sample else 1.0
    n, micro, P = exp.sequences.shape[0], ppo.train_micro_batch_size, exp.prompt_len
    updates_per_step = ppo.ppo_epochs * math.ceil(n / micro)
    sums: dict[str, float] = {}
    count = 0
    with timer("train"):
        for ppo_epoch in range(ppo.ppo_epochs):
            g = torch.Generator().manual_seed(ppo.seed * 7919 + step * 31 + ppo_epoch)
            order = torch.randperm(n, generator=g).to(exp.sequences.device)
            for start in range(0, n, micro):
                batch = exp.select(order[start:start + micro])
                m.actor.train()
                with timer("train/actor_forward_backward"):
                    logprobs = sequence_logprobs(m.actor, batch.sequences, batch.attention_mask, P, temperature)
                    policy_loss, pm = compute_policy_loss(logprobs, batch.old_logprobs, batch.advantages,
                                                          batch.response_mask, ppo.clip_range)
                    ptx_loss = torch.zeros((), device=logprobs.device)
                    if ptx is not None:
                        ids = ptx.batch(step * updates_per_step + count).to(logprobs.device)
                        logits = m.actor(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                        s, k = token_loss_sum(logits, ids)
                        ptx_loss = s / k
                    actor_loss = policy_loss + cfg.mixture.ptx_coef * ptx_loss
                    m.actor.backward(actor_loss)
                with timer("train/actor_step"):
                    m.actor.step()
                    check_finite_grad_norm(m.actor, "ppo actor")
                if m.ema is not None:
                    with timer("ema"):
                        m.ema.update(m.actor.module)

                m.critic.train()
                with timer("train/critic_forward_backward"):
                    values = sequence_values(m.critic, batch.sequences, batch.attention_mask, P).float()
                    value_loss, vm = compute_value_loss(values, batch.values, batch.returns, batch.response_mask,
                                                        ppo.clip_range_value)
                    m.critic.backward(value_loss)
                with timer("train/critic_step"):
                    m.critic.step()
                    check_finite_grad_norm(m.critic, "ppo critic")

                for k, v in {"ppo/policy_loss": policy_loss, "ppo/value_loss": value_loss, "ppo/ptx_loss": ptx_loss,
                             "ppo/clipfrac": pm["clipfrac"], "ppo/approx_kl": pm["approx_kl"],
                             "ppo/value_clipfrac": vm["value_clipfrac"]}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
    return {k: v / count for k, v in sums.items()}


# ------------------------------------------------------------------------------------------------- loop


def check_lengths(cfg: PipelineConfig, prompt_ids: list[list[int]], max_positions: int | None) -> None:
    """Refuse prompts that leave the actor no room for an answer (before any generation)."""
    longest = max(map(len, prompt_ids))
    if longest > cfg.data.max_prompt_tokens:
        raise ValueError(f"a PPO prompt has {longest} actor tokens, more than data.max_prompt_tokens "
                         f"({cfg.data.max_prompt_tokens}); the data stage drops such prompts, so re-run it")
    answer = cfg.ppo.generation.max_answer_len
    if max_positions is not None and longest + answer > max_positions:
        raise ValueError(f"prompts of up to {longest} tokens + ppo.generation.max_answer_len {answer} exceed the "
                         f"actor's {max_positions} positions: no room for an answer; lower data.max_prompt_tokens "
                         "or ppo.generation.max_answer_len")


def plan(cfg: PipelineConfig, n_prompts: int, world: int) -> tuple[int, int]:
    """(PPO steps per epoch, total PPO steps)."""
    ppo = cfg.ppo
    per_epoch = len(epoch_batches(n_prompts, ppo.rollout_batch_size, world, ppo.seed, 0)) // ppo.generation_batches
    if per_epoch == 0:
        raise ValueError(
            f"{n_prompts} PPO prompts are fewer than one step needs (rollout_batch_size {ppo.rollout_batch_size} x "
            f"generation_batches {ppo.generation_batches} x {world} processes); lower them or add prompts"
        )
    total = per_epoch * ppo.epochs
    return per_epoch, min(total, ppo.max_steps) if ppo.max_steps else total


def train_ppo(ctx: StageContext) -> Manifest | None:
    cfg, ppo, dist = ctx.cfg, ctx.cfg.ppo, ctx.dist
    torch.manual_seed(ppo.seed)
    prompts_ds = load_split(ctx.store, ctx.upstream[stages.DATA], "ppo/train")
    prompts = list(prompts_ds["prompt"])
    per_epoch, total = plan(cfg, len(prompts), dist.world_size)
    rows_per_step = ppo.rollout_batch_size * ppo.generation_batches
    total_updates = total * ppo.ppo_epochs * math.ceil(rows_per_step / ppo.train_micro_batch_size)
    m = build_models(ctx, total_updates)
    prompt_ids = tokenize_prompts(prompts, m.actor_tok, cfg.data.prompt_format)
    check_lengths(cfg, prompt_ids, getattr(m.actor.module.config, "max_position_embeddings", None))
    meta = reward_meta(_path(ctx, stages.REWARD))
    scorer = RewardScorer(m.reward, m.reward_tok, m.actor_tok, cfg.data.prompt_format,
                          meta.get("max_seq_len", cfg.reward.max_seq_len), dist.device)
    hybrid = HybridEngine(m.actor, m.actor_tok, ppo.generation, cfg.hybrid_engine, dist.world_size, log=ctx.log)
    kl_ctl = KLController(ppo.kl.coef, ppo.kl.adaptive, ppo.kl.target, ppo.kl.horizon)
    gold = _gold_fn(cfg)
    ctx.log(f"{len(prompts)} prompts, {per_epoch} steps/epoch, {total} steps; {rows_per_step} rollouts/step/process, "
            f"{total_updates} optimizer updates; reward tokenizer {'shared' if scorer.same else 'differs: text round trip'}")

    state = load_checkpoint(ctx, {"actor": m.actor, "critic": m.critic})
    resumed = state is not None
    state = state or {"global_step": 0, "epoch": 0, "pos": 0, "history": [], "resumed_from": [],
                      "kl": kl_ctl.state_dict()}
    kl_ctl.load_state_dict(state["kl"])
    if resumed and m.ema is not None:
        m.ema.load_state_dict(state.get("ema") or {})
    ptx = None
    if cfg.mixture.ptx_coef > 0:
        blocks = load_blocks(ctx.store, ctx.upstream[stages.DATA], m.actor_tok, cfg.data.ptx.block_tokens,
                             cfg.data.ptx.max_blocks)
        ptx = PtxSchedule(blocks, cfg.mixture.ptx_batch_size, dist.rank, dist.world_size, ppo.seed + 1)
    step, epoch, pos = state["global_step"], state["epoch"], state["pos"]
    log = MetricsLog(ctx.stage, ctx.run_id, ctx.is_main, history=state["history"])
    log.resumed_from = state["resumed_from"] + ([step] if resumed else [])
    progress = Progress(ctx.stage, total, initial=step, enabled=ctx.is_main)
    score_stats = (meta.get("score_mean", 0.0), meta.get("score_std", 1.0))
    t_start = time.perf_counter()

    while step < total:
        schedule = epoch_batches(len(prompts), ppo.rollout_batch_size, dist.world_size, ppo.seed, epoch)
        if pos >= per_epoch:
            epoch, pos = epoch + 1, 0
            continue
        timer = Timer(dist.device)
        t_step = time.perf_counter()
        experiences, raw_scores, golds = [], [], []
        for g in range(ppo.generation_batches):
            rows = schedule[pos * ppo.generation_batches + g][dist.rank]
            ids, mask = left_pad([prompt_ids[i] for i in rows], m.actor_tok.pad_token_id, dist.device)
            with timer("generate"):  # 1 generate rollouts
                rollout = hybrid.generate(ids, mask)
            texts = [prompts[i] for i in rows]
            exp, extra = make_experience(m, scorer, rollout, texts, cfg, kl_ctl.value, score_stats, timer)  # 2-4
            experiences.append(exp)
            raw_scores.append(extra["raw_scores"])
            if gold is not None:
                golds += gold(texts, rollout, m.actor_tok)
        exp = Experience.cat(experiences)
        mean, var = _global_mean_var(exp.advantages, exp.response_mask)  # 4 whiten over all ranks
        if ppo.whiten_advantages:
            exp = Experience(**{**exp.__dict__, "advantages": masked_whiten(exp.advantages, exp.response_mask,
                                                                           stats=(mean, var))})
        train_metrics = update(m, exp, cfg, step, ptx, timer)  # 5 (and 6's EMA)

        kl_per_seq = (exp.kl * exp.response_mask).sum(1)
        answer_len = exp.response_mask.sum(1)
        answers = exp.sequences[:, exp.prompt_len:]
        finished = ((answers == m.actor_tok.eos_token_id) & exp.response_mask.bool()).any(1)
        row = {
            **train_metrics,
            "reward/score": torch.cat(raw_scores).mean().item(),
            "reward/shaped_return": exp.rewards.sum(1).mean().item(),
            "kl/mean": kl_per_seq.mean().item(), "kl/coef": kl_ctl.value,
            "critic/value_mean": masked_mean(exp.values, exp.response_mask).item(),
            "gen/answer_len": answer_len.mean().item(),
            "gen/eos_rate": finished.float().mean().item(),
            "lr/actor": m.actor.get_lr()[0], "lr/critic": m.critic.get_lr()[0],
            **{f"timing/{k}": v for k, v in timer.times.items()}, "timing/step": time.perf_counter() - t_step,
        }
        if golds:
            row["gold/reward"] = sum(golds) / len(golds)
        row = {k: v / dist.world_size for k, v in all_reduce_sum(row).items() if not math.isnan(v)}
        kl_ctl.update(row["kl/mean"], rows_per_step * dist.world_size)  # 6 metrics, KL controller
        step, pos = step + 1, pos + 1
        if step % ppo.log_every == 0 or step == total:
            log.log(step, row)
        progress.update(1, reward=row["reward/score"], kl=row["kl/mean"])
        if step % ppo.checkpoint_every == 0 and step < total:
            extra_state = {"ema": m.ema.state_dict()} if (m.ema is not None and ctx.is_main) else {}
            save_checkpoint(ctx, step, {"actor": m.actor, "critic": m.critic},
                            {"global_step": step, "epoch": epoch, "pos": pos, "history": log.history,
                             "resumed_from": log.resumed_from, "kl": kl_ctl.state_dict(), **extra_state})
        maybe_inject_fault(ctx.stage, step)
    progress.close()
    return _export(ctx, m, log, time.perf_counter() - t_start)


def _gold_fn(cfg: PipelineConfig):
    if cfg.eval.gold_reward != "tiny_task":
        return None
    from rlhf_core.data.tiny_task import gold_reward

    def fn(prompts: list[str], rollout, tok) -> list[float]:
        answers = [r[mk.bool()].tolist() for r, mk in zip(rollout.responses.cpu(), rollout.response_mask.cpu())]
        texts = tok.batch_decode(answers, skip_special_tokens=True)
        return [gold_reward(p, a) for p, a in zip(prompts, texts)]

    return fn


def _export(ctx: StageContext, m: Models, log: MetricsLog, train_s: float) -> Manifest | None:
    cfg, ppo = ctx.cfg, ctx.cfg.ppo
    actor_state = gather_state_dict(m.actor)
    critic_state = gather_state_dict(m.critic)
    if not ctx.is_main:
        return None
    tail = log.history[-max(1, len(log.history) // 10):]  # the last tenth of training
    metrics: dict[str, Any] = {
        "steps": max((r["step"] for r in log.history), default=0),
        "reward_first": log.history[0].get("reward/score") if log.history else None,
        "reward_last": sum(r["reward/score"] for r in tail) / len(tail),
        "kl_last": sum(r["kl/mean"] for r in tail) / len(tail),
        "train_seconds": round(train_s, 2), "resumed_from": log.resumed_from,
    }
    if "gold/reward" in log.history[0]:
        metrics.update(gold_first=log.history[0]["gold/reward"], gold_last=sum(r["gold/reward"] for r in tail) / len(tail))
    sft_path, reward_path = _path(ctx, stages.SFT), _path(ctx, stages.REWARD)
    with ctx.store.open_output(ctx.stage, ctx.key) as out, tempfile.TemporaryDirectory() as tmp:
        def actor_skeleton():
            return apply_lora(load_causal_lm(sft_path, what="the SFT actor"), ppo.actor.lora)

        save_causal_lm(load_into_skeleton(actor_skeleton(), actor_state), m.actor_tok, os.path.join(tmp, "actor"),
                       card=_card("PPO actor (final)", "SFT output " + ctx.upstream[stages.SFT].key, metrics))
        if m.ema is not None:
            skeleton = actor_skeleton()
            save_causal_lm(load_into_skeleton(skeleton, m.ema.full_state_dict(skeleton)), m.actor_tok,
                           os.path.join(tmp, "actor_ema"),
                           card=_card(f"PPO actor (EMA, beta {cfg.ema.beta})", "SFT output " + ctx.upstream[stages.SFT].key, metrics))
        critic = merge_lora(load_into_skeleton(apply_lora(load_reward_model(reward_path), ppo.critic.lora), critic_state))
        save_reward_model(critic, m.reward_tok, os.path.join(tmp, "critic"), reward_meta(reward_path))
        for name in ("actor", "actor_ema", "critic"):
            if os.path.isdir(os.path.join(tmp, name)):
                out.put_dir(os.path.join(tmp, name), name)
        put_logs(out, log, tmp, f"PPO {ctx.key[:8]}")
        manifest = out.commit(stage_version=stages.VERSIONS[stages.PPO], config=stages.ppo_config(cfg),
                              upstream=ctx.upstream, metrics=metrics, producer=ctx.producer)
    log.close()
    return manifest
