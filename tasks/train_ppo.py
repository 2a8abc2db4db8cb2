from __future__ import annotations

from prefect import task

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, run_once, run_stage


def _key_of(params) -> tuple[str, str]:
    return stages.PPO, stages.ppo_key(params["cfg"], params["data"], params["sft"], params["reward"])


@task(name="train-ppo", cache_key_fn=cache_key_fn(_key_of), persist_result=True, retries=2, retry_delay_seconds=5)
def train_ppo(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest) -> Manifest:
    """Step 3: PPO of the SFT actor against the reward model (critic from the reward model, frozen
    reference, KL penalty, EMA, pretraining mixture), generation through the hybrid engine.

    Invalidated by: the data, SFT and reward outputs' contents, the ppo, ema, mixture and hybrid_engine
    sections, the corpus block size, the prompt format, the number of processes. A retry resumes from the
    latest checkpoint (actor, critic, optimizers, EMA, KL controller, RNG, data positions). Runs once across
    concurrent runs (stage lease); holds resources.gpu_slots slots of rlhf-gpu while training.
    """
    key = stages.ppo_key(cfg, data, sft, reward)
    upstream = {stages.DATA: data, stages.SFT: sft, stages.REWARD: reward}
    return run_once(cfg, stages.PPO, key, upstream, lambda: run_stage(cfg, stages.PPO, key, upstream),
                    gpu_slots=cfg.resources.gpu_slots)
