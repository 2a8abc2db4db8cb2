"""What the SFT, reward and PPO trainers share: the resume state, a deterministic batch schedule, exact
checkpoint/resume across several DeepSpeed engines, the fault seam, and gathering full weights (ZeRO-3
included)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rlhf_core.engines.training import barrier
from rlhf_core.stages.context import StageContext
from rlhf_core.storage.checkpoint import capture_rng, load_tree, restore_rng, save_tree
from rlhf_core.trainers.metrics import MetricsLog, live_dir, open_wandb

TRAINER_STATE = "trainer_state_rank{rank}"


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this stage's config."""


@dataclass
class TrainState:
    """Where a training stage is: saved with every checkpoint (one file per rank), restored on resume, so a
    restart continues with the very next batch."""

    global_step: int = 0
    epoch: int = 0
    pos: int = 0  # the epoch's next batch: a micro-batch (SFT, reward) or a PPO step
    history: list[dict[str, Any]] = field(default_factory=list)  # the metric history (MetricsLog's rows)
    resumed_from: list[int] = field(default_factory=list)  # steps this stage restarted from after a crash
    extra: dict[str, Any] = field(default_factory=dict)  # a trainer's own: the KL controller, the EMA weights


# ------------------------------------------------------------------------------------------ fault seam

FAULT_ENV = "RLHF_FAULT_KILL_AT_STEP"
FAULT_RANK_ENV = "RLHF_FAULT_RANK"  # set: only this rank is killed (the others are left to notice)


def maybe_inject_fault(stage: str, step: int) -> None:
    """Fault-injection seam for the resume tests: ``RLHF_FAULT_KILL_AT_STEP=sft:27`` makes the worker
    SIGKILL itself right after optimizer step 27 of the sft stage (no cleanup, no flush: a real crash).
    ``sft:27:/path/marker`` kills only once: the marker file records that it happened.
    ``sft:27:/path/marker:3`` kills the first 3 attempts (to outlast a task's retries): the marker counts them."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target_stage, target_step, *rest = spec.split(":", 2)
    if target_stage != stage or int(target_step) != step:
        return
    only_rank = os.environ.get(FAULT_RANK_ENV)
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    if rest:
        marker, sep, times = rest[0].rpartition(":")
        if not sep or not times.isdigit():
            marker, times = rest[0], "1"
        done = int(open(marker).read() or 0) if os.path.exists(marker) else 0
        if done >= int(times):
            return
        with open(marker, "w") as f:
            f.write(str(done + 1))
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(ctx: StageContext, engines: dict[str, Any], state: TrainState) -> None:
    """Every engine (weights, optimizer, LR schedule) plus this rank's trainer state and RNG streams."""
    t0 = time.perf_counter()
    tree = {"key": ctx.key, "rng": capture_rng(), "state": {f.name: getattr(state, f.name) for f in fields(state)}}
    with ctx.store.write_checkpoint(ctx.stage, ctx.key, state.global_step, ctx.storage.checkpoints_to_keep,
                                    rank=ctx.dist.rank, barrier=barrier) as folder:
        for name, engine in engines.items():
            engine.save_checkpoint(folder, tag=name, save_latest=False)
        save_tree(tree, os.path.join(folder, TRAINER_STATE.format(rank=ctx.dist.rank)))
    ctx.log(f"checkpoint step {state.global_step} saved in {time.perf_counter() - t0:.1f}s")


def load_checkpoint(ctx: StageContext, engines: dict[str, Any]) -> TrainState | None:
    """Restore the latest complete checkpoint into ``engines`` and the RNG streams; returns the trainer
    state, or None when the stage starts fresh."""
    step = ctx.store.latest_checkpoint(ctx.stage, ctx.key)
    if step is None:
        return None
    folder = ctx.store.fetch_checkpoint(ctx.stage, ctx.key, step, rank=ctx.dist.rank)
    state_file = os.path.join(folder, TRAINER_STATE.format(rank=ctx.dist.rank))
    if not os.path.exists(state_file):
        raise ResumeError(
            f"checkpoint {ctx.store.url_of(ctx.stage, ctx.key)}/checkpoints/step-{step:06d} has no state for rank "
            f"{ctx.dist.rank}: it was written by a run with another world size; delete it or restore that size"
        )
    tree = load_tree(state_file)
    if tree.get("key") != ctx.key:
        raise ResumeError(
            f"checkpoint step {step} under {ctx.stage}/{ctx.key} was written for stage key {tree.get('key')!r}, "
            "not this config's; it was copied or edited by hand: delete that checkpoint folder to start fresh"
        )
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(folder, tag=name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise ResumeError(f"checkpoint step {step} has no state for engine {name!r}")
    restore_rng(tree["rng"])
    ctx.log(f"resumed from checkpoint step {step}")
    return TrainState(**tree["state"])


def resume(ctx: StageContext, engines: dict[str, Any]) -> tuple[TrainState, MetricsLog]:
    """The state to start from (the latest checkpoint's, or a fresh one) and the metric log that continues
    its history."""
    state = load_checkpoint(ctx, engines)
    if state is None:
        state = TrainState()
    else:
        state.resumed_from.append(state.global_step)
    live, wandb_run = None, None
    if ctx.is_main:
        live = live_dir(ctx.store, ctx.stage, ctx.key)
        ctx.log(f"live metrics: {live} (tensorboard --logdir {live})")
        wandb_run = open_wandb(ctx.logging, ctx.stage, ctx.key, {"stage": ctx.stage, "key": ctx.key,
                                                                 **ctx.settings.model_dump(mode="json")},
                               group=ctx.producer.get("flow_run_name"), log=ctx.log)
    log = MetricsLog(ctx.stage, ctx.is_main, history=state.history, live=live, wandb_run=wandb_run)
    state.history = log.history  # one list: what the log appends, the next checkpoint saves
    return state, log


# -------------------------------------------------------------------------------------------- reductions


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum named scalars over all ranks (one small all-reduce; identity for a single process)."""
    if not values or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


# ------------------------------------------------------------------------------------------------ weights


def gather_state_dict(engine, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The full weights of an engine's module on rank 0 (None elsewhere); collective under ZeRO-3, where
    parameters are gathered one at a time so peak memory stays at one full parameter."""
    from rlhf_core.engines.training import iter_full_parameters

    module = engine.module
    is_main = torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for names, value in iter_full_parameters(module, engine.zero_optimization_stage() == 3, want=is_main):
        if is_main:
            copy = value.detach().to("cpu", dtype or value.dtype).clone()
            out.update({n: copy for n in names})
    if not is_main:
        return None
    persistent = set(module.state_dict())
    out.update({n: b.detach().to("cpu").clone() for n, b in module.named_buffers() if n in persistent})
    return out


def load_into_skeleton(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load gathered weights into a freshly built module (tied weights re-tied); every parameter must be
    covered, or the saved model would silently contain random values."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if not any(k.endswith(t) or t.endswith(k) for t in tied) and "lm_head" not in k]
    if real_missing or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    return model
