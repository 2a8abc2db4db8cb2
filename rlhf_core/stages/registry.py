"""Stage names, versions and cache keys (DESIGN.md: "Cache keys and resume").

Key = hash(stage name, stage version, the config fields that change the stage's output, the upstream
manifests' content ids). No run id, no storage root, no launcher: a new flow run, a retry, or the same
config on another machine reuses a finished stage. Bump a stage's version when its code changes what it
writes.
"""

from __future__ import annotations

from typing import Any

from rlhf_core.config import ModelSpec, PipelineConfig
from rlhf_core.storage.store import Manifest, hash_key

DATA, SFT, REWARD, PPO, EXPORT, EVALUATE = "data", "sft", "reward", "ppo", "export", "evaluate"
VERSIONS = {DATA: 1, SFT: 1, REWARD: 1, PPO: 1, EXPORT: 1, EVALUATE: 1}
ORDER = [DATA, SFT, REWARD, PPO, EXPORT, EVALUATE]
# What each stage is made from (the pipeline's graph; the stage flows run a stage and what it needs).
INPUTS = {DATA: [], SFT: [DATA], REWARD: [DATA], PPO: [DATA, SFT, REWARD], EXPORT: [PPO],
          EVALUATE: [DATA, SFT, REWARD, EXPORT]}


def needed_for(stage: str) -> set[str]:
    """``stage`` and every stage it is made from, transitively (``needed_for('ppo')`` has no export)."""
    if stage not in INPUTS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(ORDER)}")
    out = {stage}
    for up in INPUTS[stage]:
        out |= needed_for(up)
    return out


def _model(spec: ModelSpec) -> dict[str, Any]:
    from rlhf_core.data.prepare import tokenizer_fingerprint

    out = spec.model_dump(mode="json")
    # A local tokenizer folder counts by content, not by where the checkout happens to be.
    out["tokenizer"] = tokenizer_fingerprint(spec.tokenizer_path, spec.revision)
    return out


def _key(stage: str, config: dict[str, Any], upstream: dict[str, Manifest]) -> str:
    return hash_key(
        {
            "stage": stage,
            "version": VERSIONS[stage],
            "config": config,
            "upstream": {name: m.content_id for name, m in sorted(upstream.items())},
        }
    )


def data_key(cfg: PipelineConfig) -> str:
    from rlhf_core.data.prepare import data_stage_key

    return data_stage_key(cfg)


def sft_config(cfg: PipelineConfig) -> dict[str, Any]:
    out = {"actor": _model(cfg.models.actor), "sft": cfg.sft.model_dump(mode="json"),
           "prompt_format": cfg.data.prompt_format, "world_size": cfg.resources.world_size}
    if cfg.sft.ptx_coef > 0:
        out["ptx"] = cfg.data.ptx.model_dump(mode="json", exclude={"path"})
    return out


def reward_config(cfg: PipelineConfig) -> dict[str, Any]:
    # Not the actor: every actor run with the same reward settings shares one reward model.
    return {"reward_model": _model(cfg.models.reward), "reward": cfg.reward.model_dump(mode="json", exclude={"existing"}),
            "prompt_format": cfg.data.prompt_format, "world_size": cfg.resources.world_size}


def ppo_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"ppo": cfg.ppo.model_dump(mode="json"), "ema": cfg.ema.model_dump(mode="json"),
            "mixture": cfg.mixture.model_dump(mode="json"), "ptx": cfg.data.ptx.model_dump(mode="json", exclude={"path"}),
            "hybrid_engine": cfg.hybrid_engine.model_dump(mode="json"), "prompt_format": cfg.data.prompt_format,
            "max_prompt_tokens": cfg.data.max_prompt_tokens, "world_size": cfg.resources.world_size,
            "gold_reward": cfg.eval.gold_reward}


def sft_key(cfg: PipelineConfig, data: Manifest) -> str:
    return _key(SFT, sft_config(cfg), {DATA: data})


def reward_key(cfg: PipelineConfig, data: Manifest) -> str:
    return _key(REWARD, reward_config(cfg), {DATA: data})


def ppo_key(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest) -> str:
    return _key(PPO, ppo_config(cfg), {DATA: data, SFT: sft, REWARD: reward})


def export_key(cfg: PipelineConfig, ppo: Manifest) -> str:
    return _key(EXPORT, cfg.export.model_dump(mode="json"), {PPO: ppo})


def evaluate_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"eval": cfg.eval.model_dump(mode="json"), "prompt_format": cfg.data.prompt_format,
            "max_answer_len": cfg.eval.max_answer_len or cfg.ppo.generation.max_answer_len,
            "ptx_block_tokens": cfg.data.ptx.block_tokens}


def evaluate_key(cfg: PipelineConfig, data: Manifest, sft: Manifest, reward: Manifest, export: Manifest) -> str:
    return _key(EVALUATE, evaluate_config(cfg), {DATA: data, SFT: sft, REWARD: reward, EXPORT: export})
