from __future__ import annotations

from prefect import get_run_logger, task

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.stages.export import run_export
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, producer, run_once, store_for


def _key_of(params) -> tuple[str, str]:
    return stages.EXPORT, stages.export_key(params["cfg"], params["ppo"])


@task(name="export-actors", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=1)
def export_actors(cfg: PipelineConfig, ppo: Manifest) -> Manifest:
    """The final and EMA actors as plain HF models (LoRA merged, safetensors) with model cards.

    Invalidated by: the PPO output's content and the export section (dtype). Runs once across concurrent
    runs (stage lease).
    """
    store, key = store_for(cfg), stages.export_key(cfg, ppo)

    def run() -> Manifest:
        manifest = run_export(cfg, store, key, ppo, producer=producer())
        for name in manifest.metrics["models"]:
            get_run_logger().info("exported %s actor: %s", name, store.url_of(stages.EXPORT, key, name))
        return manifest

    return run_once(cfg, stages.EXPORT, key, {stages.PPO: ppo}, run)
