from __future__ import annotations

from prefect import get_run_logger, task

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import EXPORT, RL
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, manifest_of, run_stage, store_for


@task(name="export-actors", cache_key_fn=cache_key_fn(EXPORT), persist_result=True, retries=1)
def export_actors(cfg: PipelineConfig, rl: Manifest) -> Manifest:
    """The final and EMA actors as plain HF models (LoRA merged, safetensors) with model cards.

    Invalidated by: the PPO output's content and the export section (dtype). Runs inside this task, once
    across concurrent runs (stage lease).
    """
    result = run_stage(cfg, EXPORT, {RL: rl})
    manifest = manifest_of(result)
    store = store_for(cfg)
    for name in manifest.metrics["models"]:
        get_run_logger().info("exported %s actor: %s", name, store.url_of(EXPORT, manifest.key, name))
    return result
