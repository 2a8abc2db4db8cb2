from __future__ import annotations

from prefect import get_run_logger, task

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.data.prepare import run_data_stage
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, producer, run_once, store_for


def _key_of(params) -> tuple[str, str]:
    return stages.DATA, stages.data_key(params["cfg"])


@task(name="prepare-data", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=1, retry_delay_seconds=5)
def prepare_data(cfg: PipelineConfig) -> Manifest:
    """Unify, split and blend the sources into Arrow datasets in the store.

    Invalidated by: the data section (sources, weights, split, seeds, limits), the bytes of every source
    file and of the pretraining corpus, and the actor tokenizer (it measures prompt lengths). Not by file
    locations, the storage root or anything downstream. Runs once across concurrent runs (stage lease).
    """
    store, key = store_for(cfg), stages.data_key(cfg)

    def run() -> Manifest:
        manifest = run_data_stage(cfg, store, key=key, producer=producer())
        get_run_logger().info("data: %s rows -> %s", manifest.metrics["rows"], store.url_of(stages.DATA, key))
        return manifest

    return run_once(cfg, stages.DATA, key, {}, run)
