from __future__ import annotations

from prefect import task

from rlhf_core import stages
from rlhf_core.config import PipelineConfig
from rlhf_core.store import Manifest
from tasks.common import cache_key_fn, cached, run_stage, store_for


def _key_of(params) -> tuple[str, str]:
    return stages.REWARD, stages.reward_key(params["cfg"], params["data"])


@task(name="train-reward", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=2, retry_delay_seconds=5)
def train_reward(cfg: PipelineConfig, data: Manifest) -> Manifest:
    """Step 2: the reward model, trained on the reward split's preference pairs.

    Invalidated by: the data output's content, models.reward, the reward section, the prompt format and
    the number of processes. Not by the actor: every actor with the same reward settings shares it.
    """
    store, key = store_for(cfg), stages.reward_key(cfg, data)
    existing = store.read_manifest(stages.REWARD, key)
    if existing is not None:
        return cached(existing, store)
    return run_stage(cfg, stages.REWARD, key, {stages.DATA: data})
