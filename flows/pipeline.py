"""The end-to-end pipeline: data -> (SFT || reward) -> step 3 (PPO, GRPO, RLOO, REINFORCE++; or DPO, which needs no
reward model) -> export -> evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.params import RunParams, flow_run_name
from rlhf_core.stages import lineage
from rlhf_core.stages.registry import DATA, EVALUATE, EXPORT, RL, REPORT, REWARD, SFT, headline, needed_for
from rlhf_core.config import PipelineConfig
from rlhf_core.data.prepare import source_summary
from rlhf_core.stages.preflight import preflight
from rlhf_core.storage.store import Manifest
from tasks.runner import ensure_gpu_limit, store_for
from tasks.prepare_data import prepare_data
from tasks.evaluate_actors import evaluate
from tasks.export_actors import export_actors
from tasks.train_rl import train_rl
from tasks.train_reward import train_reward, use_reward_model
from tasks.train_sft import train_sft


@flow(name="rlhf-pipeline", flow_run_name=lambda: flow_run_name("pipeline"))
def rlhf_pipeline(params: RunParams = RunParams()) -> dict[str, Any]:
    """Run every stage of the profile; finished stages are cache hits."""
    return run_pipeline(params, until=EVALUATE)


def run_pipeline(params: RunParams, until: str) -> dict[str, Any]:
    """The stages ``until`` needs, in pipeline order (the body of the pipeline and of each stage flow)."""
    cfg = params.config()
    preflight(cfg, until)  # the store, a reward.existing, the sources' files: refused before any work starts
    if cfg.resources.gpu_slots:
        ensure_gpu_limit(None, at_least=cfg.resources.gpu_slots)  # once, before stages race to create it
    need = needed_for(until, cfg)  # with DPO or a rule-based reward alone, step 3 needs no reward model
    runs: dict[str, Any] = {}
    runs[DATA] = data = prepare_data.submit(cfg)
    if SFT in need:
        runs[SFT] = train_sft.submit(cfg, data)
    if REWARD in need:  # independent of the actor: runs beside SFT
        runs[REWARD] = use_reward_model.submit(cfg) if cfg.reward.existing else train_reward.submit(cfg, data)
    if RL in need:
        runs[RL] = train_rl.submit(cfg, data, runs[SFT], runs.get(REWARD))
    if EXPORT in need:
        runs[EXPORT] = export_actors.submit(cfg, runs[RL])
    if EVALUATE in need:
        runs[EVALUATE] = evaluate.submit(cfg, data, runs[SFT], runs.get(REWARD), runs[RL], runs[EXPORT])
    outputs = {name: future.result() for name, future in runs.items()}
    create_markdown_artifact(
        key="rlhf-run-summary", description=f"Outputs of this run ({params.run_name()})",
        markdown=lineage.summary_markdown(f"RLHF run: {params.run_name()}", store_for(cfg), outputs,
                                          {name: future.state.name for name, future in runs.items()}))
    return summarize(cfg, outputs)


def summarize(cfg: PipelineConfig, outputs: dict[str, Manifest]) -> dict[str, Any]:
    """Where every output is, and the numbers a person looks at first."""
    store = store_for(cfg)
    summary: dict[str, Any] = {"outputs": {name: store.url_of(m.stage, m.key) for name, m in outputs.items()}}
    lines = {name: headline(m) for name, m in outputs.items() if name not in (EVALUATE, EXPORT) and headline(m)}
    if EVALUATE in outputs:
        models = outputs[EVALUATE].metrics["models"]
        for metric in models[SFT]:
            lines[metric] = "  ".join(f"{name} {_fmt(row[metric])}" for name, row in models.items())
        summary["report"] = store.url_of(EVALUATE, outputs[EVALUATE].key, REPORT)
    summary["headline"] = lines
    if DATA in outputs:
        summary["sources"] = source_summary(outputs[DATA].metrics)
    return summary


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
