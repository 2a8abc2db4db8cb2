from __future__ import annotations

from prefect import task

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import DATA, SFT
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, run_stage


@task(name="train-sft", cache_key_fn=cache_key_fn(SFT), persist_result=True, retries=2, retry_delay_seconds=5)
def train_sft(cfg: PipelineConfig, data: Manifest) -> Manifest:
    """Step 1: supervised fine-tuning of the actor on the SFT split.

    Invalidated by (its settings view, rlhf_core/config/views.py): the data output's content, models.actor
    (the tokenizer and a local model by content), the sft section, the prompt format, the corpus blocks
    when sft.ptx_coef > 0, and the number of processes. A retry resumes from the latest checkpoint. Runs once
    across concurrent runs (stage lease); holds resources.gpu_slots slots of rlhf-gpu while training.
    """
    return run_stage(cfg, SFT, {DATA: data}, gpu_slots=cfg.resources.gpu_slots)
