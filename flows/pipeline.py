"""The end-to-end pipeline: data -> (SFT || reward) -> PPO -> export -> evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import RunParams
from rlhf_core.store import Manifest
from tasks.common import store_for
from tasks.data import prepare_data
from tasks.reward import train_reward
from tasks.sft import train_sft


@flow(name="rlhf-pipeline", flow_run_name=lambda: _run_name())
def rlhf_pipeline(params: RunParams = RunParams()) -> dict[str, Any]:
    """Run every stage of the profile; finished stages are cache hits."""
    cfg = params.config()
    data = prepare_data.submit(cfg)
    sft = train_sft.submit(cfg, data)
    reward = train_reward.submit(cfg, data)  # independent of the actor: runs beside SFT
    return summarize(cfg, {"data": data.result(), "sft": sft.result(), "reward": reward.result()})


def summarize(cfg, outputs: dict[str, Manifest]) -> dict[str, Any]:
    store = store_for(cfg)
    return {name: {"url": store.url_of(m.stage, m.key), "metrics": m.metrics} for name, m in outputs.items()}


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = RunParams.model_validate(flow_run.parameters.get("params") or {})
    return f"pipeline: {params.run_name()}"
