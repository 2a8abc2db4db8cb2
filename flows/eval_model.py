"""Evaluate a model the user brings (``rlhf eval --model``): the profile's data, SFT actor and reward model
(cache hits when a run made them), then the evaluate stage's report for that model beside the SFT actor."""

from __future__ import annotations

from prefect import flow

from flows.params import RunParams, flow_run_name
from rlhf_core.stages.preflight import preflight
from rlhf_core.stages.registry import RL
from tasks.evaluate_actors import evaluate_model
from tasks.prepare_data import prepare_data
from tasks.train_reward import train_reward, use_reward_model
from tasks.train_sft import train_sft


@flow(name="rlhf-eval-model", flow_run_name=lambda: flow_run_name("eval"))
def eval_model_flow(params: RunParams, model: str, name: str, out: str) -> dict[str, dict[str, float]]:
    """``model`` (a folder, store URL or hub name) on the profile's held-out prompts, against its SFT actor and
    scored by its reward model; the report goes to the local folder ``out``. Returns model -> metric -> value."""
    cfg = params.config()
    preflight(cfg, RL)  # the held-out prompts are the rl step's eval split
    data = prepare_data.submit(cfg)
    sft = train_sft.submit(cfg, data)
    reward = None
    if cfg.eval.reward_model:  # off: the gold reward alone judges, and no reward model is trained
        reward = use_reward_model.submit(cfg) if cfg.reward.existing else train_reward.submit(cfg, data)
    return evaluate_model(cfg, data, sft, reward, model, name, out)
