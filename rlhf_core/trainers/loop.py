"""The training loop shared by the SFT, reward and DPO stages.

Per optimizer step: ``gradient_accumulation_steps`` micro-batches per rank, DeepSpeed's backward/step,
metrics reduced over ranks, a checkpoint every ``checkpoint_every`` steps and an evaluation every
``eval_every``. The position (epoch, micro-batch) is part of the checkpoint, so a restart continues with
the very next micro-batch and, with the RNG streams restored, computes what the uninterrupted run would.

Loss normalisation: the step function receives the number of loss units (tokens for SFT, pairs for the
reward model) in the whole accumulation window over all ranks, and returns ``sum * world * accum /
window_units``; after DeepSpeed's 1/accum scaling and the all-reduce average, the gradient is the exact
mean over the window, whatever the world size or accumulation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_core.data.batches import epoch_batches
from rlhf_core.config import TrainStageConfig
from rlhf_core.engines.training import check_finite_grad_norm
from rlhf_core.trainers.metrics import MetricsLog, Progress
from rlhf_core.stages.context import StageContext
from rlhf_core.trainers.state import (TrainState, all_reduce_sum, maybe_inject_fault, resume,
                                      save_checkpoint)

# (row indices, window units, global micro-batch index) -> (loss to backprop, per-micro metric sums)
StepFn = Callable[[list[int], float, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopSpec:
    stage_cfg: TrainStageConfig
    n_rows: int
    units: Callable[[list[int]], int]  # loss units (tokens, pairs) in a list of rows
    step: StepFn
    evaluate: Callable[[], dict[str, float]]
    after_step: Callable[[], None] | None = None  # after every optimizer step (DPO's EMA update)
    extra_state: Callable[[], dict] | None = None  # what else a checkpoint holds (TrainState.extra: the EMA)
    load_extra: Callable[[dict], None] | None = None  # restores it on resume


def plan_steps(cfg: TrainStageConfig, n_rows: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    micro_steps = n_rows // (cfg.micro_batch_size * world)
    per_epoch = micro_steps // cfg.gradient_accumulation_steps
    if per_epoch == 0:
        raise ValueError(
            f"{n_rows} training rows are fewer than one optimizer step needs "
            f"(micro_batch_size {cfg.micro_batch_size} x accumulation {cfg.gradient_accumulation_steps} x "
            f"{world} processes); lower the batch size or add data"
        )
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def run_loop(ctx: StageContext, engine, spec: LoopSpec) -> tuple[MetricsLog, TrainState]:
    """Train to the end (from the latest checkpoint, if any); returns the metric log and the final state."""
    cfg = spec.stage_cfg
    world, rank, accum = ctx.dist.world_size, ctx.dist.rank, cfg.gradient_accumulation_steps
    per_epoch, total = plan_steps(cfg, spec.n_rows, world)
    ctx.log(f"{spec.n_rows} rows, {per_epoch} steps/epoch, {total} steps; global batch "
            f"{cfg.micro_batch_size * accum * world} = micro {cfg.micro_batch_size} x accum {accum} x {world} procs")

    state, log = resume(ctx, {"engine": engine})
    if state.resumed_from and spec.load_extra is not None:
        spec.load_extra(state.extra)
    step, epoch, micro_pos = state.global_step, state.epoch, state.pos
    if step == 0:
        log.log(0, {f"eval/{k}": v for k, v in spec.evaluate().items()})
    progress = Progress(ctx.stage, total, initial=step, enabled=ctx.is_main)
    t_step = time.perf_counter()
    sums: dict[str, float] = {}

    while step < total:
        schedule = epoch_batches(spec.n_rows, cfg.micro_batch_size, world, cfg.seed, epoch)
        usable = len(schedule) - len(schedule) % accum
        for mi in range(micro_pos, usable):
            start = mi - mi % accum
            window_units = sum(spec.units(rows) for batch in schedule[start:start + accum] for rows in batch)
            engine.train()
            loss, metrics = spec.step(schedule[mi][rank], float(window_units), epoch * usable + mi)
            engine.backward(loss)
            engine.step()
            if (mi + 1) % accum == 0:
                check_finite_grad_norm(engine, ctx.stage)
                if spec.after_step is not None:
                    spec.after_step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if (mi + 1) % accum:
                continue
            step += 1
            reduced = all_reduce_sum(sums)
            sums = {}
            elapsed = time.perf_counter() - t_step
            t_step = time.perf_counter()
            row = {k.removeprefix("sum/"): v / window_units for k, v in reduced.items() if k.startswith("sum/")}
            row.update({"lr": engine.get_lr()[0], "timing/step_s": elapsed})
            if step % cfg.log_every == 0 or step == total:
                log.log(step, row)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                log.log(step, {f"eval/{k}": v for k, v in spec.evaluate().items()})
            progress.update(1, **{k: v for k, v in row.items() if k in ("loss", "accuracy")})
            if step % cfg.checkpoint_every == 0 and step < total:
                state.global_step, state.epoch, state.pos = step, epoch, mi + 1
                if spec.extra_state is not None:
                    state.extra = spec.extra_state()
                save_checkpoint(ctx, {"engine": engine}, state)
            maybe_inject_fault(ctx.stage, step)
            if step >= total:
                break
        else:
            epoch, micro_pos = epoch + 1, 0
            continue
        break
    log.log(step, {f"eval/{k}": v for k, v in spec.evaluate().items()})
    progress.close()
    state.global_step, state.epoch = step, epoch
    return log, state
