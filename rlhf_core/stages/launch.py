"""The worker entry: run one stage in this process (and its peers).

    python -m rlhf_core.stages.launch sft|reward|ppo JOB_URL
    torchrun --nproc_per_node 2 -m rlhf_core.stages.launch sft JOB_URL
    deepspeed --hostfile H --no_local_rank --module rlhf_core.stages.launch sft JOB_URL

A job (``Job``, JSON at a local path or store URL) carries the whole validated config, the stage's key and
the upstream manifests, so every rank on every node runs exactly the same thing. Rank 0 writes the stage
output and its manifest; the caller reads the manifest back from the store.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import fsspec
from pydantic import BaseModel, Field

from rlhf_core.config import PipelineConfig
from rlhf_core.storage.store import Manifest, Store


class Job(BaseModel):
    stage: str
    key: str
    config: dict[str, Any]
    upstream: dict[str, Manifest] = Field(default_factory=dict)
    producer: dict[str, Any] = Field(default_factory=dict)


def trainers() -> dict[str, Callable]:
    """Stage name -> the function that runs it on a StageContext (rank 0 returns the manifest)."""
    from rlhf_core.stages.evaluate import run_evaluate
    from rlhf_core.trainers.ppo import train_ppo
    from rlhf_core.trainers.reward import train_reward
    from rlhf_core.trainers.sft import train_sft

    return {"sft": train_sft, "reward": train_reward, "ppo": train_ppo, "evaluate": run_evaluate}


def run_job(job: Job) -> Manifest | None:
    """Run a job in this process: distributed init, the stage's trainer, the output (rank 0)."""
    from rlhf_core.engines.training import barrier, init_distributed
    from rlhf_core.trainers.state import StageContext

    cfg = PipelineConfig.model_validate(job.config)
    res = cfg.resources
    dist = init_distributed(res.device, res.master_addr, res.master_port, res.cpu_threads)
    store = Store.from_config(cfg.storage)
    existing = store.read_manifest(job.stage, job.key)
    if existing is not None:
        return existing
    import datetime
    import socket

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    producer = {**job.producer, "started_at": started, "host": socket.gethostname(), "world_size": dist.world_size}
    ctx = StageContext(cfg, store, job.stage, job.key, job.upstream, dist, producer)
    manifest = trainers()[job.stage](ctx)
    barrier()
    if ctx.is_main and not cfg.storage.keep_checkpoints_after_commit:
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


def command(cfg: PipelineConfig, stage: str, job_url: str) -> list[str]:
    """The command line that runs a stage with the configured launcher."""
    res = cfg.resources
    entry = ["-m", "rlhf_core.stages.launch", stage, job_url]
    if res.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={res.nnodes}",
                f"--nproc_per_node={res.nproc_per_node}", f"--master_addr={res.master_addr}",
                f"--master_port={res.master_port or _port()}", *entry]
    if res.launcher == "deepspeed":
        cmd = ["deepspeed", "--no_local_rank", f"--master_port={res.master_port or _port()}"]
        if res.hostfile:
            cmd += [f"--hostfile={res.hostfile}", f"--num_nodes={res.nnodes}", f"--master_addr={res.master_addr}"]
        cmd += [f"--num_gpus={res.nproc_per_node}", "--module", "rlhf_core.stages.launch", stage, job_url]
        return cmd
    return [sys.executable, *entry]


def _port() -> int:
    from rlhf_core.engines.training import free_port

    return free_port()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    stage, url = argv
    job = read_job(url)
    if job.stage != stage:
        print(f"launch: job {url} is for stage {job.stage!r}, not {stage!r}", file=sys.stderr)
        return 2
    manifest = run_job(job)
    if manifest is not None:
        print(f"[{stage}] done: {manifest.stage}/{manifest.key} content {manifest.content_id[:12]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
