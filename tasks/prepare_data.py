from __future__ import annotations

from prefect import get_run_logger, task

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import DATA
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, manifest_of, run_stage


@task(name="prepare-data", cache_key_fn=cache_key_fn(DATA), persist_result=True, retries=1, retry_delay_seconds=5)
def prepare_data(cfg: PipelineConfig) -> Manifest:
    """Unify, split and blend the sources into Arrow datasets in the store.

    Invalidated by: the data section (sources, weights, split, seeds, limits), the bytes of every source
    file and of the pretraining corpus, and the actor tokenizer (it measures prompt lengths). Not by file
    locations, the storage root or anything downstream. Runs inside this task, once across concurrent runs
    (stage lease).
    """
    result = run_stage(cfg, DATA, {})
    manifest = manifest_of(result)
    get_run_logger().info("data: %s rows", manifest.metrics["rows"])
    return result
