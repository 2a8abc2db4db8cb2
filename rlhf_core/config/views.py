"""Each stage's settings view: the part of the config a stage reads, and exactly what its cache key holds.

A stage's worker is given its view and nothing else (``rlhf_core/stages/launch.py``), so it cannot read a
setting its key does not hold: "same key, same bytes" holds by construction, not by review. A view is cut
out of a :class:`PipelineConfig` by its ``from_config``; the registry (``rlhf_core/stages/registry.py``)
hashes it, with file names in ``CONTENT_KEYED`` fields replaced by the files' content.

What a view leaves out is what cannot change a stage's output: where it is stored (``storage``), how it is
launched (``resources`` other than the number of processes, which changes the batch schedule), the
schedule, the profile's name, ``reward.existing``, and every setting of other stages.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from rlhf_core.config.schema import (CONTENT_KEYED, FUNCTION_KEYED, DataConfig, DPOConfig, EMAConfig, EvalConfig, ExportConfig,
                                     GenerationConfig, HybridEngineConfig, MixtureConfig, ModelSpec, PipelineConfig,
                                     RLConfig, PromptFormat, Section, SFTConfig, TrainStageConfig)


class TokenizerSpec(Section):
    """A tokenizer as a model spec names it (the data stage measures prompts in the actor's tokens)."""

    tokenizer: str = Field(description="Tokenizer name or path.", json_schema_extra=CONTENT_KEYED)
    revision: str | None = Field(None, description="Hub revision.")
    pad_token: str | None = Field(None, description="Pad token when the tokenizer has none ('eos': the EOS token).")
    trust_remote_code: bool = Field(False, description="Allow code from the tokenizer's repository to run.")

    @classmethod
    def of(cls, spec: ModelSpec) -> "TokenizerSpec":
        return cls(tokenizer=spec.tokenizer_path, revision=spec.revision, pad_token=spec.pad_token,
                   trust_remote_code=spec.trust_remote_code)


class PtxBlocks(Section):
    """How a stage cuts the stored pretraining corpus into blocks (the corpus itself is the data output's)."""

    block_tokens: int = Field(description="Tokens per block.")
    max_blocks: int | None = Field(None, description="Use at most this many blocks.")

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "PtxBlocks":
        return cls(block_tokens=cfg.data.ptx.block_tokens, max_blocks=cfg.data.ptx.max_blocks)


class DataSettings(Section):
    data: DataConfig = Field(description="Sources (keyed by their files' content), split, blending, corpus.")
    actor_tokenizer: TokenizerSpec = Field(description="Measures PPO prompts against data.max_prompt_tokens.")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "DataSettings":
        return cls(data=cfg.data, actor_tokenizer=TokenizerSpec.of(cfg.models.actor))


class SFTSettings(Section):
    actor: ModelSpec = Field(description="models.actor")
    sft: SFTConfig = Field(description="sft")
    prompt_format: PromptFormat = Field(description="data.prompt_format")
    ptx: PtxBlocks | None = Field(description="data.ptx's blocks, when sft.ptx_coef > 0")
    world_size: int = Field(description="Processes: they change the batch schedule.")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "SFTSettings":
        return cls(actor=cfg.models.actor, sft=cfg.sft, prompt_format=cfg.data.prompt_format,
                   ptx=PtxBlocks.of(cfg) if cfg.sft.ptx_coef > 0 else None, world_size=cfg.resources.world_size)


class RewardSettings(Section):
    """Not the actor: every actor run with the same reward settings shares one reward model."""

    reward_model: ModelSpec = Field(description="models.reward")
    reward: TrainStageConfig = Field(description="reward, without reward.existing")
    prompt_format: PromptFormat = Field(description="data.prompt_format")
    world_size: int = Field(description="Processes: they change the batch schedule.")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "RewardSettings":
        train = TrainStageConfig(**{k: getattr(cfg.reward, k) for k in TrainStageConfig.model_fields})
        return cls(reward_model=cfg.models.reward, reward=train, prompt_format=cfg.data.prompt_format,
                   world_size=cfg.resources.world_size)


class RewardSignal(Section):
    """What scores a step-3 answer: the reward model (read from the reward stage's output), a rule-based function
    (keyed by its module's content), or both."""

    use_model: bool = Field(description="reward.use_model")
    function: str | None = Field(description="reward.function", json_schema_extra=FUNCTION_KEYED)
    function_weight: float = Field(description="reward.function_weight")

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "RewardSignal":
        r = cfg.reward
        return cls(use_model=r.use_model, function=r.function, function_weight=r.function_weight)


class RLSettings(Section):
    rl: RLConfig = Field(description="rl")
    reward: RewardSignal = Field(description="reward.use_model, reward.function, reward.function_weight")
    ema: EMAConfig = Field(description="ema")
    mixture: MixtureConfig = Field(description="mixture")
    ptx: PtxBlocks | None = Field(description="data.ptx's blocks, when mixture.ptx_coef > 0")
    hybrid_engine: HybridEngineConfig = Field(description="hybrid_engine")
    prompt_format: PromptFormat = Field(description="data.prompt_format")
    max_prompt_tokens: int = Field(description="data.max_prompt_tokens (checked against the prompts)")
    gold_reward: str | None = Field(description="eval.gold_reward, logged as gold/reward during training",
                                    json_schema_extra=FUNCTION_KEYED)
    world_size: int = Field(description="Processes: they change the batch schedule.")

    @property
    def scores_with_reward_model(self) -> bool:
        return self.rl.algorithm != "dpo" and self.reward.use_model

    @property
    def reads_reward_output(self) -> bool:
        """Whether step 3 reads the reward stage's output: to score answers, or to initialise PPO's critic."""
        return self.scores_with_reward_model or self.rl.uses_critic

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "RLSettings":
        # rl.dpo counts only for DPO: changing it does not re-run PPO (or GRPO...)
        rl = cfg.rl if cfg.rl.algorithm == "dpo" else cfg.rl.model_copy(update={"dpo": DPOConfig()})
        return cls(rl=rl, reward=RewardSignal.of(cfg), ema=cfg.ema, mixture=cfg.mixture,
                   ptx=PtxBlocks.of(cfg) if cfg.mixture.ptx_coef > 0 else None, hybrid_engine=cfg.hybrid_engine,
                   prompt_format=cfg.data.prompt_format, max_prompt_tokens=cfg.data.max_prompt_tokens,
                   gold_reward=cfg.eval.gold_reward, world_size=cfg.resources.world_size)


class ExportSettings(Section):
    """The model cards are written from the step-3 manifest (its settings and metrics), not from this config."""

    export: ExportConfig = Field(description="export")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "ExportSettings":
        return cls(export=cfg.export)


class EvaluateSettings(Section):
    eval: EvalConfig = Field(description="eval")
    generation: GenerationConfig = Field(description="Answer sampling: eval's, with rl's answer length by default.")
    hybrid_engine: HybridEngineConfig = Field(description="hybrid_engine (the fast path samples differently)")
    prompt_format: PromptFormat = Field(description="data.prompt_format")
    ptx_block_tokens: int = Field(description="data.ptx.block_tokens, for the held-out perplexity")

    @property
    def reads_reward_output(self) -> bool:
        return self.eval.reward_model

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "EvaluateSettings":
        e = cfg.eval
        gen = GenerationConfig(max_answer_len=e.max_answer_len or cfg.rl.generation.max_answer_len,
                               do_sample=e.do_sample, temperature=e.temperature)
        return cls(eval=e, generation=gen, hybrid_engine=cfg.hybrid_engine, prompt_format=cfg.data.prompt_format,
                   ptx_block_tokens=cfg.data.ptx.block_tokens)


def leaf_paths(value: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of a view (or any section): ``{'sft.optimizer.lr', ...}``."""
    if isinstance(value, Section):
        out: set[str] = set()
        for name in type(value).model_fields:
            out |= leaf_paths(getattr(value, name), f"{prefix}{name}.")
        return out
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Section) for v in value):
        return set().union(*(leaf_paths(v, f"{prefix}{i}.") for i, v in enumerate(value)))
    return {prefix.rstrip(".")}
