"""The worker entry: run one stage in this process (and its peers).

    python -m rlhf_core.stages.launch sft|reward|rl|evaluate JOB_URL
    torchrun --nproc_per_node 2 -m rlhf_core.stages.launch sft JOB_URL
    deepspeed --hostfile H --no_local_rank --module rlhf_core.stages.launch sft JOB_URL

A job (``Job``, JSON at a local path or store URL) carries the stage's settings view, its key, the
upstream manifests and the run-time resources, so every rank on every node runs exactly the same thing
and no rank can see more of the config than the stage's key holds. Rank 0 writes the stage output and its
manifest; the caller reads the manifest back from the store.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

import fsspec
from pydantic import BaseModel, Field

from rlhf_core.config import LoggingConfig, PipelineConfig, ResourcesConfig, StorageConfig
from rlhf_core.stages.context import DistInfo, StageContext
from rlhf_core.stages.registry import Stage, key_of_settings, stage
from rlhf_core.storage.store import STORE_UNAVAILABLE_EXIT, Manifest, Store, unavailable, unreachable
from rlhf_core.trainers.metrics import QUIET_PROGRESS

ENTRY = "rlhf_core.stages.launch"
# Set by a launcher for its own processes; a worker must get fresh ones from its own launcher.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# NVLink multicast off in NCCL, PyTorch and NVSHMEM: on shared multi-GPU hosts a program using it can take
# the host's GPUs out of service. Workers inherit these unless the user set them.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Runtime(BaseModel):
    """Resources that cannot change a stage's output: where it is stored, how it is launched, where its
    curves go besides the store."""

    storage: StorageConfig
    resources: ResourcesConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class Job(BaseModel):
    stage: str
    key: str
    settings: dict[str, Any] = Field(description="the stage's settings view, as its key hashes it")
    upstream: dict[str, Manifest] = Field(default_factory=dict)
    runtime: Runtime
    producer: dict[str, Any] = Field(default_factory=dict)


def make_job(cfg: PipelineConfig, name: str, key: str, upstream: dict[str, Manifest],
             producer: dict[str, Any] | None = None) -> Job:
    """The job of stage ``name``: its settings view cut out of ``cfg``, the inputs it reads under them (of
    ``upstream``; the manifest records exactly these), and the run-time resources."""
    record = stage(name)
    settings = record.settings_of(cfg)
    reads = record.inputs_of(settings)
    missing = [up for up in reads if upstream.get(up) is None]
    if missing:
        raise ValueError(f"stage {name} reads the outputs of {', '.join(missing)} under this config, but none was given")
    upstream = {up: upstream[up] for up in reads}
    return Job(stage=name, key=key, settings=settings.model_dump(mode="json"), upstream=upstream,
               runtime=Runtime(storage=cfg.storage, resources=cfg.resources, logging=cfg.logging),
               producer=producer or {})


def entry_of(record: Stage) -> Callable[[StageContext], Manifest | None]:
    module, _, fn = record.entry.partition(":")
    return getattr(importlib.import_module(module), fn)


def context_of(job: Job, dist: DistInfo) -> StageContext:
    """The stage's context: its settings view (validated), the inputs, the run-time resources."""
    record = stage(job.stage)
    settings = record.settings.model_validate(job.settings)
    if key_of_settings(job.stage, settings, job.upstream) != job.key:
        raise ValueError(f"job for {job.stage}/{job.key}: its settings and inputs hash to another key; the job file "
                         "was edited or written by another version of rlhf-flow")
    world = getattr(settings, "world_size", 1)
    if record.worker and world != dist.world_size:
        raise ValueError(f"{job.stage} is keyed for {world} processes but runs in {dist.world_size}; launch it with "
                         "the profile's resources")
    import datetime
    import socket

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    producer = {**job.producer, "started_at": started, "host": socket.gethostname(), "world_size": dist.world_size}
    return StageContext(stage=job.stage, version=record.version, key=job.key, settings=settings, upstream=job.upstream,
                        store=Store.from_config(job.runtime.storage), storage=job.runtime.storage, dist=dist,
                        producer=producer, logging=job.runtime.logging)


def run_job(job: Job) -> Manifest | None:
    """Run a job in this process: distributed set-up for worker stages, the stage's entry, the output (rank 0)."""
    record = stage(job.stage)
    res = job.runtime.resources
    store = Store.from_config(job.runtime.storage)
    existing = store.read_manifest(job.stage, job.key)
    if existing is not None:
        return existing
    if record.worker:
        from rlhf_core.engines.training import barrier, init_distributed

        dist = init_distributed(res.device, res.master_addr, res.master_port, res.cpu_threads)
    else:
        dist, barrier = DistInfo.single(), (lambda: None)
    ctx = context_of(job, dist)
    manifest = entry_of(record)(ctx)
    barrier()
    if ctx.is_main and not job.runtime.storage.keep_checkpoints_after_commit:
        store.delete_checkpoints(job.stage, job.key)
    return manifest


def write_job(store: Store, job: Job) -> str:
    """Put the job next to the stage's output so that every node can read it; returns its URL."""
    path = store.output_path(job.stage, job.key, "job.json")
    store.write_bytes_atomic(path, job.model_dump_json(indent=2).encode())
    return store.url_of(job.stage, job.key, "job.json")


def read_job(url: str) -> Job:
    with fsspec.open(url, "rb") as f:
        return Job.model_validate_json(f.read())


def command(res: ResourcesConfig, stage_name: str, job_url: str) -> list[str]:
    """The command line that runs a stage with the configured launcher."""
    entry = ["-m", ENTRY, stage_name, job_url]
    if res.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={res.nnodes}",
                f"--nproc_per_node={res.nproc_per_node}", f"--master_addr={res.master_addr}",
                f"--master_port={res.master_port or _port()}", *entry]
    if res.launcher == "deepspeed":
        cmd = ["deepspeed", "--no_local_rank", f"--master_port={res.master_port or _port()}"]
        if res.hostfile:
            cmd += [f"--hostfile={res.hostfile}", f"--num_nodes={res.nnodes}", f"--master_addr={res.master_addr}"]
        cmd += [f"--num_gpus={res.nproc_per_node}", "--module", ENTRY, stage_name, job_url]
        return cmd
    return [sys.executable, *entry]


def worker_env(cpu_threads: int | None = None) -> dict[str, str]:
    """The environment of a worker process: this one's, without a launcher's process-group variables, with
    progress as lines (the task turns them into a progress artifact), unbuffered output and no third-party
    progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(RLHF_PROGRESS="lines", PYTHONUNBUFFERED="1")
    for name, value in QUIET_PROGRESS.items():
        env.setdefault(name, value)
    for name, value in NO_MULTICAST.items():
        env.setdefault(name, value)
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def _port() -> int:
    from rlhf_core.engines.training import free_port

    return free_port()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, url = argv
    job = None
    try:
        job = read_job(url)
        if job.stage != name:
            print(f"launch: job {url} is for stage {job.stage!r}, not {name!r}", file=sys.stderr)
            return 2
        manifest = run_job(job)
    except Exception as e:
        if not unreachable(e):
            raise
        # An outage of the store is not a bug: one line (the task turns the exit code into StoreUnavailable).
        root = job.runtime.storage.root if job else url.rsplit("/", 3)[0]  # <root>/<stage>/<key>/job.json
        print(f"[{name}] {unavailable(root, e)}", flush=True)
        return STORE_UNAVAILABLE_EXIT
    if manifest is not None:
        print(f"[{name}] done: {manifest.stage}/{manifest.key} content {manifest.content_id[:12]}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # The output and its manifest are written and the process group has met its last barrier: skip the
    # interpreter's teardown (torch, DeepSpeed and gloo take 1-2 s of it on 2 cores, per worker).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
