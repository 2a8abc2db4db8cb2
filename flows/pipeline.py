"""The end-to-end pipeline: data -> (SFT || reward) -> PPO -> export -> evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.params import RunParams, flow_run_name
from rlhf_core.stages import registry as stages
from rlhf_core.storage import lineage
from rlhf_core.config import PipelineConfig
from rlhf_core.stages.existing import existing_reward
from rlhf_core.storage.store import Manifest
from tasks.runner import store_for
from tasks.prepare_data import prepare_data
from tasks.evaluate_actors import evaluate
from tasks.export_actors import export_actors
from tasks.train_ppo import train_ppo
from tasks.train_reward import train_reward, use_reward_model
from tasks.train_sft import train_sft


@flow(name="rlhf-pipeline", flow_run_name=lambda: flow_run_name("pipeline"))
def rlhf_pipeline(params: RunParams = RunParams()) -> dict[str, Any]:
    """Run every stage of the profile; finished stages are cache hits."""
    return run_pipeline(params, until=stages.EVALUATE)


def run_pipeline(params: RunParams, until: str) -> dict[str, Any]:
    """The stages ``until`` needs, in pipeline order (the body of the pipeline and of each stage flow)."""
    cfg = params.config()
    existing_reward(cfg)  # a reward model that is not there is refused before any work starts
    need = stages.needed_for(until)
    runs: dict[str, Any] = {}
    runs["data"] = data = prepare_data.submit(cfg)
    if stages.SFT in need:
        runs["sft"] = train_sft.submit(cfg, data)
    if stages.REWARD in need:  # independent of the actor: runs beside SFT
        runs["reward"] = use_reward_model.submit(cfg) if cfg.reward.existing else train_reward.submit(cfg, data)
    if stages.PPO in need:
        runs["ppo"] = train_ppo.submit(cfg, data, runs["sft"], runs["reward"])
    if stages.EXPORT in need:
        runs["export"] = export_actors.submit(cfg, runs["ppo"])
    if stages.EVALUATE in need:
        runs["evaluate"] = evaluate.submit(cfg, data, runs["sft"], runs["reward"], runs["export"])
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
    headline: dict[str, Any] = {}
    if "sft" in outputs:
        headline["sft held-out loss"] = _fmt(outputs["sft"].metrics.get("eval_loss"))
    if "reward" in outputs:
        headline["reward model held-out accuracy"] = _fmt(outputs["reward"].metrics.get("eval_accuracy"))
    if "evaluate" in outputs:
        models = outputs["evaluate"].metrics["models"]
        for metric in ("reward_score", "win_rate_vs_sft", "gold_reward", "kl_to_sft", "ptx_perplexity"):
            if metric in models.get("sft", {}):
                headline[metric] = "  ".join(f"{name} {_fmt(row[metric])}" for name, row in models.items())
        summary["report"] = store.url_of("evaluate", outputs["evaluate"].key, "report.md")
    summary["headline"] = headline
    return summary


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
