"""What a run checks before any work starts (``rlhf run`` before Prefect, the flows before their first task):
the store root can be written, a ``reward.existing`` is there, every source's files exist and are files of a
known format, and every step the run needs has a source. Each refusal names the key and the fix."""

from __future__ import annotations

from rlhf_core.config import PipelineConfig
from rlhf_core.data.prepare import check_sources
from rlhf_core.stages.existing import existing_reward
from rlhf_core.stages.registry import REWARD, RL, needed_for
from rlhf_core.storage.store import check_root


def preflight(cfg: PipelineConfig, until: str) -> None:
    """Refuse a run up to stage ``until`` that could not finish for a reason known now.

    Raises:
        ConfigError: the store root, or a reward.existing that is not there.
        DataError: a source's files, or a step no source feeds.
    """
    existing_reward(cfg)
    stages = needed_for(until, cfg) - ({REWARD} if cfg.reward.existing else set())
    splits = set(stages)  # the data splits the run reads, named after the stages that read them
    if cfg.rl.algorithm == "dpo" and RL in stages:  # DPO learns from the reward split's pairs (evaluation samples
        splits.add(REWARD)                           # the rl split's held-out prompts)
    check_sources(cfg.data, splits)
    check_root(cfg.storage.root, cfg.storage.endpoint_url)
