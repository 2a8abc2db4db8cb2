"""Running stages the way the tasks do (a worker subprocess per stage), for resume and launcher tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf_core.config import PipelineConfig
from rlhf_core.stages import registry
from rlhf_core.stages.launch import command, make_job, run_job, worker_env, write_job
from rlhf_core.storage.store import Manifest, Store


def prepare(cfg: PipelineConfig) -> Manifest:
    """The data stage, in this process (as its task runs it)."""
    return run_stage_here(cfg, registry.DATA, {})


def run_stage_here(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest]) -> Manifest:
    """Run a stage in this process (the worker's code path without a subprocess) and return its manifest."""
    run_job(make_job(cfg, stage, registry.key(stage, cfg, upstream), upstream))
    return output(cfg, stage, upstream)


def worker(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest], fault: str | None = None,
           timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one stage as `python -m rlhf_core.stages.launch` (or torchrun, per cfg.resources) and wait."""
    store = Store.from_config(cfg.storage)
    url = write_job(store, make_job(cfg, stage, registry.key(stage, cfg, upstream), upstream))
    env = {**worker_env(cpu_threads=1), **(env or {})}
    if fault:
        env["RLHF_FAULT_KILL_AT_STEP"] = fault
    return subprocess.run(command(cfg.resources, stage, url), env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parent.parent)


def output(cfg: PipelineConfig, stage: str, upstream: dict[str, Manifest]) -> Manifest | None:
    return Store.from_config(cfg.storage).read_manifest(stage, registry.key(stage, cfg, upstream))


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


def copy_trained(tiny_trained: dict, root: Path) -> PipelineConfig:
    """A new store holding the session's data, SFT and reward outputs (so PPO tests skip steps 1-2)."""
    import shutil

    src = Path(Store.from_config(tiny_trained["cfg"].storage).root)
    for stage in (registry.DATA, registry.SFT, registry.REWARD):
        shutil.copytree(src / stage, root / stage)
    return root


def evaluate_actor(cfg: PipelineConfig, tiny: dict, actor_path: str | None):
    """Sample the held-out prompts from an actor (None: the SFT model) the way the evaluate stage does."""
    from rlhf_core.config.views import EvaluateSettings
    from rlhf_core.data.prepare import load_split
    from rlhf_core.stages.evaluate import sample_model
    from rlhf_core.trainers.experience import RewardScorer, tokenize_prompts
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.reward_model import load_reward_model
    from rlhf_core.models.tokenizers import load_saved_tokenizer
    from rlhf_core.data.ptx import load_blocks

    store = Store.from_config(tiny["cfg"].storage)
    sft_path = store.fetch("sft", tiny["sft"].key, "model")
    rm_path = store.fetch("reward", tiny["reward"].key, "model")
    tok = load_saved_tokenizer(sft_path, padding_side="left")
    scorer = RewardScorer(load_reward_model(rm_path).eval(), load_saved_tokenizer(rm_path), tok,
                          cfg.data.prompt_format, cfg.reward.max_seq_len, torch.device("cpu"))
    prompts = list(load_split(store, tiny["data"], "rl/eval")["prompt"])[: cfg.eval.num_prompts]
    blocks = load_blocks(store, tiny["data"], tok, cfg.data.ptx.block_tokens, cfg.eval.ptx_blocks, split="eval")
    sft = load_causal_lm(sft_path).eval()
    model = load_causal_lm(actor_path).eval() if actor_path else sft
    s = sample_model(model, sft, tok, scorer, prompts, tokenize_prompts(prompts, tok, cfg.data.prompt_format),
                     EvaluateSettings.from_config(cfg), torch.device("cpu"), blocks)
    n = len(s.gold)
    return {"gold": sum(s.gold) / n, "kl": sum(s.kl) / n, "ppl": s.ptx_perplexity, "score": sum(s.scores) / n}


def task_states(flow_run_id, attempt: int = 1) -> dict[str, str]:
    """Task name -> state name of the task runs of one attempt of a flow run (a retried flow run makes new
    task runs, numbered by ``flow_run_run_count``), read through Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.flow_run_run_count == attempt}


def task_runs(flow_run_id) -> dict[str, object]:
    """Task name -> task run (first attempt) of a flow run, with its start and end times."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs if r.flow_run_run_count == 1}


def flow_run_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
