"""What every stage task shares: the store, the Prefect cache key, the store-first cache check, the stage
lease and the GPU slots.

The store is the source of truth. A task first looks for ``<stage>/<key>/manifest.json``; if it is there
the stage is done (even if Prefect's database was wiped) and the task finishes as ``Cached`` without
writing anything. Prefect's own cache sits on top: its key includes the output's content id, so it can
only ever hit for an output that still exists in the store, unchanged.

Otherwise the task takes the stage's lease in the store (rlhf_core/storage/lease.py), so that of several runs
needing the same output one produces it and the others wait and then find it; a training stage then
takes slots of the Prefect global concurrency limit ``rlhf-gpu``, so that concurrent runs queue for GPUs.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import get_run_logger
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Completed, State

from rlhf_core.config import ConfigError, PipelineConfig
from rlhf_core.stages import registry
from rlhf_core.storage.lease import LeaseRecord, StageLease
from rlhf_core.storage.store import (STORE_UNAVAILABLE_EXIT, Manifest, Store, StoreUnavailable, hash_key, unavailable,
                                    unreachable)

GPU_LIMIT = "rlhf-gpu"  # Prefect global concurrency limit that training stages take GPU slots from


def store_for(cfg: PipelineConfig) -> Store:
    return Store.from_config(cfg.storage)


def inputs_of(stage: str, params: dict[str, Any]) -> dict[str, Manifest]:
    """The upstream manifests among a stage task's parameters (named after the stages they come from) that the
    stage reads under its config (``registry.inputs``: with DPO, step 3 reads no reward model)."""
    return {up: params[up] for up in registry.inputs(stage, params["cfg"])}


def cache_key_fn(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect cache key that exists only while the store holds the output: ``stage-key-contentid-store``.
    Without an output there is no key, so Prefect never serves a result the store no longer has; the store's
    URL is part of it, since equal keys in two stores are two outputs (two manifests)."""

    def fn(_ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
        key = registry.key(stage, params["cfg"], inputs_of(stage, params))
        store = store_for(params["cfg"])
        try:
            cid = store.manifest_id(stage, key)
        except Exception as e:  # the task itself meets the store next and says what is wrong, once
            if unreachable(e):
                return None
            raise
        return f"{stage}-{key}-{cid[:16]}-{hash_key(store.url)[:8]}" if cid else None

    return fn


def cached(manifest: Manifest, store: Store) -> State:
    """The state a task returns for an output that is already complete in the store."""
    get_run_logger().info("%s: cached (complete in %s)", manifest.stage, store.url_of(manifest.stage, manifest.key))
    return Completed(name="Cached", message=f"complete in {store.url_of(manifest.stage, manifest.key)}", data=manifest)


def manifest_of(result: Manifest | State) -> Manifest:
    """The manifest a stage task returns, whether it ran (a Manifest) or found its output (a Cached state)."""
    return result if isinstance(result, Manifest) else result.result()


def producer() -> dict[str, Any]:
    """Lineage recorded in manifests: which flow run and task run produced an output."""
    out: dict[str, Any] = {}
    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    if flow_ctx and flow_ctx.flow_run:
        out.update(flow_run_id=str(flow_ctx.flow_run.id), flow_run_name=flow_ctx.flow_run.name,
                   flow_name=flow_ctx.flow.name if flow_ctx.flow else None)
    if task_ctx and task_ctx.task_run:
        out.update(task_run_id=str(task_ctx.task_run.id))
    return out


def run_once(cfg: PipelineConfig, stage: str, key: str, upstream: dict[str, Manifest],
             run: Callable[[StageLease], Manifest], gpu_slots: int = 0) -> Manifest | State:
    """Produce ``<stage>/<key>`` with ``run(lease)`` unless the store has it or another run produces it.

    Under the stage's lease, look for the manifest again (a run that waited for the holder finds it and is
    Cached), else hold ``gpu_slots`` slots of ``rlhf-gpu`` and run. A run that takes over from a killed
    holder (at once if it was on this machine, else when its lease expires) resumes from the holder's
    checkpoints. Slots are taken inside the lease, never the other way round: a run waiting for a lease
    holds no GPU (and two runs cannot deadlock on lease and slots).
    """
    store = store_for(cfg)
    logger = _logger()
    lease = StageLease(store, stage, key, ttl=cfg.storage.lease_seconds, holder=producer(),
                       upstream={s: m.key for s, m in upstream.items()}, log=logger.info)
    try:
        existing = store.read_manifest(stage, key)
        if existing is not None:  # the common case needs no lease
            return cached(existing, store)
        with lease:
            if lease.took_over is not None and lease.took_over.holder_gone():
                mark_crashed(lease.took_over)
            existing = store.read_manifest(stage, key)
            if existing is not None:
                return cached(existing, store)
            with gpu_slots_held(cfg, gpu_slots):
                manifest = run(lease)
    except Exception as e:
        if unreachable(e):
            raise unavailable(store.url, e) from None
        raise
    if lease.lost.is_set():
        logger.warning("the lease on %s was lost while it ran (another run may have produced it too)", stage)
    return manifest


def mark_crashed(gone: LeaseRecord) -> None:
    """A run whose process died (SIGKILL) stays Running in Prefect's database: nothing reports its end. When
    a lease is taken over from such a holder, mark its flow run and task run Crashed, saying who took over.
    Best effort: a holder that reported to another Prefect server is not found here."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    who = producer().get("flow_run_name", "another run")
    message = (f"its process ({gone.process.describe() if gone.process else 'unknown'}) is gone; {who} took over "
               f"{gone.stage}/{gone.key}")
    ids = gone.holder
    try:
        with get_client(sync_client=True) as client:
            for run_id, read, write in ((ids.get("task_run_id"), client.read_task_run, client.set_task_run_state),
                                        (ids.get("flow_run_id"), client.read_flow_run, client.set_flow_run_state)):
                if run_id and not read(uuid.UUID(run_id)).state.is_final():
                    write(uuid.UUID(run_id), Crashed(message=message), force=True)
    except ObjectNotFound:
        pass
    except Exception as e:  # never fail a stage over bookkeeping
        _logger().warning("could not mark the killed run %s Crashed in Prefect: %s", ids.get("flow_run_id"), e)


@contextmanager
def gpu_slots_held(cfg: PipelineConfig, occupy: int) -> Iterator[None]:
    """Hold ``occupy`` slots of the ``rlhf-gpu`` global concurrency limit (nothing when 0), creating the
    limit, sized to this machine's GPUs, if nobody has (Prefect does not gate on a missing limit)."""
    if occupy <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    limit = ensure_gpu_limit(None, at_least=occupy)
    if limit < occupy:
        raise ConfigError(
            f"resources.gpu_slots is {occupy} but the Prefect concurrency limit {GPU_LIMIT!r} has {limit} slots, "
            f"so this stage could never start: raise the limit (`rlhf serve --gpus {occupy}` or "
            f"`prefect gcl update {GPU_LIMIT} --limit {occupy}`) or lower resources.gpu_slots"
        )
    _logger().info("taking %d slot(s) of %s (waits while other stages hold them)", occupy, GPU_LIMIT)
    # Prefect's server takes slot leases of 60 s to 1 day; its own heartbeat renews them.
    with concurrency(GPU_LIMIT, occupy=occupy, strict=True, lease_duration=min(max(cfg.storage.lease_seconds, 60), 86400)):
        yield


def ensure_gpu_limit(size: int | None, at_least: int = 1) -> int:
    """Make the ``rlhf-gpu`` limit exist; returns its size. ``size``: set it to this many slots. None:
    leave an existing limit as it is; create a missing one with one slot per GPU of this machine (at least
    ``at_least``, so that a stage asking for slots on a machine without GPUs can run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        if size is not None:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, size)
            return size
        try:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit
        except ObjectNotFound:
            pass
        slots = max(gpu_count(), at_least)
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            _logger().info("created the concurrency limit %s with %d slots", GPU_LIMIT, slots)
        except ObjectAlreadyExists:  # another run created it meanwhile
            pass
        return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit


def _logger():
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class StageFailed(RuntimeError):
    """A stage worker exited with an error; the task fails (and Prefect's retry resumes it)."""


def run_stage(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest], gpu_slots: int = 0) -> Manifest | State:
    """Produce ``stage``'s output for ``cfg`` from its inputs, once (``run_once``), and return its manifest.

    A stage that runs inside its task (data, export) runs here. A worker stage runs in this process with
    ``launcher: inprocess`` (one CPU process; stages then share its RNG and torch state, so the flow should
    not run two at once), otherwise as a subprocess (python, torchrun or the DeepSpeed launcher) whose output
    streams into the Prefect run logger, whose progress lines drive a progress artifact, and whose non-zero
    exit fails the task. Either way the stage sees only its settings view (``make_job``).
    """
    from rlhf_core.stages.launch import command, make_job, run_job, write_job

    upstream = {up: m for up, m in upstream.items() if up in registry.inputs(stage, cfg)}  # e.g. no reward for DPO
    key = registry.key(stage, cfg, upstream)
    store = store_for(cfg)

    def run(lease: StageLease) -> Manifest:
        logger = _logger()
        logger.info("%s: started (%s)", stage, registry.stage(stage).title)
        t0 = time.perf_counter()
        job = make_job(cfg, stage, key, upstream, producer())
        try:
            if not registry.stage(stage).worker or cfg.resources.launcher == "inprocess":
                run_job(job)
                how = ""
            else:
                stats = _stream(command(cfg.resources, stage, write_job(store, job)), stage, cfg, lease)
                how = f" (worker: {stats})"
        except BaseException:
            logger.info("%s: failed after %.1f s", stage, time.perf_counter() - t0)
            raise
        manifest = store.read_manifest(stage, key)
        if manifest is None:
            raise StageFailed(f"{stage} finished without writing {store.url_of(stage, key)}/manifest.json")
        logger.info("%s: done in %.1f s%s", stage, time.perf_counter() - t0, how)
        return manifest

    return run_once(cfg, stage, key, upstream, run, gpu_slots=gpu_slots)


@dataclass
class WorkerStats:
    """What a stage's worker cost: from launch to its first progress line (imports, model build, engine set-up)
    and its CPU time (user + system, its own children included)."""

    startup_s: float | None
    cpu_s: float

    def __str__(self) -> str:
        start = f"ready to train in {self.startup_s:.1f} s, " if self.startup_s is not None else ""
        return f"{start}{self.cpu_s:.1f} s CPU"


def _stream(cmd: list[str], stage: str, cfg: PipelineConfig, lease: StageLease) -> WorkerStats:
    """Run a worker, its output into the run logger (third-party noise left out), its progress lines into a
    progress artifact and readable progress lines; raises StageFailed with its last lines if it fails
    (StoreUnavailable if it exited for an outage of the store). The worker gets its own session (so its group
    holds it, and a launcher's ranks, and nothing else); the group is stopped with this process however this
    process dies (``rlhf_core.stages.reaper``), and is recorded in the lease, so that nobody takes the stage
    over while it may still write."""
    import collections
    import json
    import signal
    import subprocess

    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from rlhf_core.stages import reaper
    from rlhf_core.stages.launch import worker_env
    from rlhf_core.storage.process import process_id
    from rlhf_core.trainers.metrics import PROGRESS_PREFIX, ProgressLines

    logger = get_run_logger()
    logger.info("launching %s: %s", stage, " ".join(cmd))
    artifact = create_progress_artifact(0.0, description=f"{stage}: training progress")
    lines = ProgressLines(stage, logger.info)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    t0, ready = time.perf_counter(), None
    shown: dict[str, bool] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=worker_env(cfg.resources.cpu_threads), start_new_session=True)
    group = process_id(proc.pid)  # None: it has already exited
    try:
        if group is not None:
            reaper.adopt(group, group=True)
            lease.add_worker(group)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith(PROGRESS_PREFIX):
                info = json.loads(line[len(PROGRESS_PREFIX):])
                ready = ready if ready is not None else time.perf_counter() - t0
                lines.feed(info)
                try:
                    update_progress_artifact(artifact, 100.0 * info["step"] / max(info["total"], 1))
                except Exception as e:  # Prefect's API away for a moment must not stop a training stage
                    if not shown.get("artifact_error"):
                        logger.warning("progress artifact not updated (%s); training goes on", e)
                        shown["artifact_error"] = True
                continue
            if line and not _noise(line):
                tail.append(line)
                logger.info(line)
        # wait4, not wait: the worker's CPU time comes with its exit status.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    except BaseException:
        if group is not None:
            group.kill(signal.SIGKILL, group=True)  # the launcher and its ranks, not only the launcher
        proc.kill()
        proc.wait()
        raise
    finally:
        if group is not None:
            reaper.forget(group)
    if code == STORE_UNAVAILABLE_EXIT:
        raise StoreUnavailable(tail[-1].split("] ", 1)[-1] if tail else f"{stage}: the store cannot be reached")
    if code != 0:
        raise StageFailed(f"{stage} worker exited with code {code}; last output:\n" + "\n".join(tail))
    return WorkerStats(ready, usage.ru_utime + usage.ru_stime)


def _noise(line: str) -> bool:
    """What says nothing a user needs: DeepSpeed's accelerator chatter and third-party progress bars (bars are
    also turned off in workers: worker_env)."""
    return "real_accelerator.py" in line or line.startswith(("Writing model shards", "Loading weights"))
