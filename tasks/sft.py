from __future__ import annotations

from prefect import task

from rlhf_core import stages
from rlhf_core.config import PipelineConfig
from rlhf_core.store import Manifest
from tasks.common import cache_key_fn, cached, run_stage, store_for


def _key_of(params) -> tuple[str, str]:
    return stages.SFT, stages.sft_key(params["cfg"], params["data"])


@task(name="train-sft", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=2, retry_delay_seconds=5)
def train_sft(cfg: PipelineConfig, data: Manifest) -> Manifest:
    """Step 1: supervised fine-tuning of the actor on the SFT split.

    Invalidated by: the data output's content, models.actor (including the tokenizer's content), the sft
    section, the prompt format and the number of processes. A retry resumes from the latest checkpoint.
    """
    store, key = store_for(cfg), stages.sft_key(cfg, data)
    existing = store.read_manifest(stages.SFT, key)
    if existing is not None:
        return cached(existing, store)
    return run_stage(cfg, stages.SFT, key, {stages.DATA: data})
