"""One flow per stage: each runs the pipeline up to and including its stage (and only what that stage is
made from), so the UI can start "just the data", "just the reward model" or "up to PPO"."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import RunParams, flow_run_name
from flows.pipeline import run_pipeline
from rlhf_core.stages import registry as stages


@flow(name="rlhf-data", flow_run_name=lambda: flow_run_name(stages.DATA))
def data_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """Step 0: unify, blend and split the profile's data sources into Arrow datasets in the store."""
    return run_pipeline(params, until=stages.DATA)


@flow(name="rlhf-sft", flow_run_name=lambda: flow_run_name(stages.SFT))
def sft_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """Data, then step 1: the SFT actor."""
    return run_pipeline(params, until=stages.SFT)


@flow(name="rlhf-reward", flow_run_name=lambda: flow_run_name(stages.REWARD))
def reward_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """Data, then step 2: the reward model (or reward.existing)."""
    return run_pipeline(params, until=stages.REWARD)


@flow(name="rlhf-rl", flow_run_name=lambda: flow_run_name(stages.RL))
def rl_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """Data, SFT and reward, then step 3: PPO."""
    return run_pipeline(params, until=stages.RL)


@flow(name="rlhf-export", flow_run_name=lambda: flow_run_name(stages.EXPORT))
def export_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """Everything up to PPO, then the exported final and EMA actors."""
    return run_pipeline(params, until=stages.EXPORT)


@flow(name="rlhf-evaluate", flow_run_name=lambda: flow_run_name(stages.EVALUATE))
def evaluate_flow(params: RunParams = RunParams()) -> dict[str, Any]:
    """The whole pipeline under the evaluation stage's name (same as rlhf-pipeline)."""
    return run_pipeline(params, until=stages.EVALUATE)


STAGE_FLOWS = {stages.DATA: data_flow, stages.SFT: sft_flow, stages.REWARD: reward_flow, stages.RL: rl_flow,
               stages.EXPORT: export_flow, stages.EVALUATE: evaluate_flow}
