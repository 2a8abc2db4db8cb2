from __future__ import annotations

from prefect import task

from rlhf_core.config import PipelineConfig
from rlhf_core.stages.registry import DATA, RL, REWARD, SFT
from rlhf_core.storage.store import Manifest
from tasks.runner import cache_key_fn, run_stage


@task(name="train-rl", cache_key_fn=cache_key_fn(RL), persist_result=True, retries=2, retry_delay_seconds=5)
def train_rl(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest | None = None) -> Manifest:
    """Step 3: the SFT actor trained by rl.algorithm: PPO (critic from the reward model, GAE), GRPO, RLOO or
    REINFORCE++ (n answers per prompt, no critic), all with a frozen reference, KL, EMA, pretraining mixture and
    the hybrid engine's generation; or DPO on the preference pairs (no rollouts, no reward model: ``reward``
    is None). Answers are scored by the reward model, a rule (reward.function), or both.

    Invalidated by (its settings view): the data, SFT and (when read) reward outputs' contents, the rl, ema,
    mixture and hybrid_engine sections, reward.use_model / function (by its module's content) /
    function_weight, the corpus blocks when mixture.ptx_coef > 0, the prompt format and length limit,
    eval.gold_reward (logged while training) and the number of processes. A retry resumes from the latest
    checkpoint (actor, critic, optimizers, EMA, KL controller, RNG, data positions). Runs once across
    concurrent runs (stage lease); holds resources.gpu_slots slots of rlhf-gpu while training.
    """
    return run_stage(cfg, RL, {DATA: data, SFT: sft, REWARD: reward}, gpu_slots=cfg.resources.gpu_slots)
