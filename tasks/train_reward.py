from __future__ import annotations

from prefect import task

from rlhf_core.config import ConfigError, PipelineConfig
from rlhf_core.stages.existing import existing_reward, import_reward
from rlhf_core.stages.registry import DATA, REWARD
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, producer, run_once, run_stage, store_for


@task(name="train-reward", cache_key_fn=cache_key_fn(REWARD), persist_result=True, retries=2, retry_delay_seconds=5)
def train_reward(cfg: PipelineConfig, data: Manifest) -> Manifest:
    """Step 2: the reward model, trained on the reward split's preference pairs.

    Invalidated by (its settings view): the data output's content, models.reward, the reward section (not
    reward.existing), the prompt format and the number of processes. Not by the actor: every actor with the same reward settings
    shares it, and of several runs that need it at once one trains it while the others wait for its stage
    lease and then find it (Cached). Holds resources.gpu_slots slots of rlhf-gpu while training.
    """
    return run_stage(cfg, REWARD, {DATA: data}, gpu_slots=cfg.resources.gpu_slots)


@task(name="use-reward-model", persist_result=True, retries=1, retry_delay_seconds=5)
def use_reward_model(cfg: PipelineConfig) -> Manifest:
    """Step 2 replaced: the reward output that reward.existing names (a key of this store, or a folder URL,
    whose files are copied into this store under the same key, hashes checked, manifest last).

    No Prefect cache key: the store check reads one manifest, and a copy is Cached once it is complete.
    """
    found = existing_reward(cfg)
    if found is None:
        raise ConfigError("use-reward-model needs reward.existing (a reward key or URL)")
    source, manifest = found
    store = store_for(cfg)
    return run_once(cfg, REWARD, manifest.key, {},
                    lambda _lease: import_reward(source, manifest, store, producer=producer()))
