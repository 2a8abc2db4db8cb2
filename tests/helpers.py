"""Running stages the way the tasks do (a worker subprocess per stage), for resume and launcher tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf_core import stages
from rlhf_core.config import PipelineConfig
from rlhf_core.data.prepare import run_data_stage
from rlhf_core.launch import Job, command, write_job
from rlhf_core.store import Manifest, Store

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
KEYS = {
    stages.SFT: lambda cfg, up: stages.sft_key(cfg, up[stages.DATA]),
    stages.REWARD: lambda cfg, up: stages.reward_key(cfg, up[stages.DATA]),
    stages.PPO: lambda cfg, up: stages.ppo_key(cfg, up[stages.DATA], up[stages.SFT], up[stages.REWARD]),
}


def prepare(cfg: PipelineConfig) -> Manifest:
    return run_data_stage(cfg, Store.from_config(cfg.storage))


def worker(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest], fault: str | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess:
    """Run one stage as `python -m rlhf_core.launch` (or torchrun, per cfg.resources) and wait."""
    store = Store.from_config(cfg.storage)
    key = KEYS[stage](cfg, upstream)
    url = write_job(store, Job(stage=stage, key=key, config=cfg.model_dump(mode="json"), upstream=upstream))
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(RLHF_PROGRESS="lines", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if fault:
        env["RLHF_FAULT_KILL_AT_STEP"] = fault
    return subprocess.run(command(cfg, stage, url), env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)


def output(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest]) -> Manifest | None:
    return Store.from_config(cfg.storage).read_manifest(stage, KEYS[stage](cfg, upstream))


def weights(cfg: PipelineConfig, manifest: Manifest, rel: str = "model/model.safetensors") -> dict[str, torch.Tensor]:
    store = Store.from_config(cfg.storage)
    return load_file(store.fetch(manifest.stage, manifest.key, rel))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs (max {(a[name] - b[name]).abs().max():.3g})"
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
