from __future__ import annotations

from prefect import task

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, run_once, run_stage


def _key_of(params) -> tuple[str, str]:
    return stages.SFT, stages.sft_key(params["cfg"], params["data"])


@task(name="train-sft", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=2, retry_delay_seconds=5)
def train_sft(cfg: PipelineConfig, data: Manifest) -> Manifest:
    """Step 1: supervised fine-tuning of the actor on the SFT split.

    Invalidated by: the data output's content, models.actor (including the tokenizer's content), the sft
    section, the prompt format and the number of processes. A retry resumes from the latest checkpoint.
    Runs once across concurrent runs (stage lease); holds resources.gpu_slots slots of rlhf-gpu while training.
    """
    key, upstream = stages.sft_key(cfg, data), {stages.DATA: data}
    return run_once(cfg, stages.SFT, key, upstream, lambda: run_stage(cfg, stages.SFT, key, upstream),
                    gpu_slots=cfg.resources.gpu_slots)
