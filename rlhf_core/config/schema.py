"""The pipeline configuration's schema: one frozen pydantic section per YAML section.

Every field has a description, bounds or ``Literal`` choices, so the YAML, the Prefect UI form and the docs
agree. Sections are validated once (``profiles.load_config``) and frozen.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

class ConfigError(ValueError):
    """A profile or override is invalid; the message names the key and what is allowed."""


_REWARD_KEY = re.compile(r"(reward/)?[0-9a-f]{20}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# How prompts reach the models: DeepSpeed-Chat's " Human: ... Assistant:" text, or the tokenizer's chat template.
PromptFormat = Literal["human_assistant", "chat_template"]
# The config's precision names; rlhf_core.models.loading maps them to torch dtypes.
Precision = Literal["fp32", "bf16", "fp16"]
# A field whose value names files (a path or URL): cache keys hold the files' content, not the name, so the
# same bytes elsewhere give the same key and changed bytes at the same place give a new one
# (rlhf_core/stages/registry.py). Hub names are keyed by name and the hub's revision.
CONTENT_KEYED = {"keyed_by": "content"}
# A field whose value names a Python function, "package.module:function": cache keys hold the module file's
# content (rlhf_core/storage/fingerprint.py), so an edited rule gives a new key. Only that file counts, not
# what it imports.
FUNCTION_KEYED = {"keyed_by": "module_content"}
_FUNCTION_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def function_spec(v: str | None, key: str) -> str | None:
    """A "package.module:function" reference as given (None or empty: none), or a ValueError naming ``key``."""
    if v is None or not v.strip():
        return None
    v = v.strip()
    if not _FUNCTION_SPEC.fullmatch(v):
        raise ValueError(f"{key} {v!r} is not a function reference; write it as package.module:function, e.g. "
                         "rlhf_core.data.tiny_task:gold_reward (the module must be importable by the workers)")
    return v


# ----------------------------------------------------------------------------------------------- storage


class StorageConfig(Section):
    root: str = Field(
        "file://./rlhf-store",
        description="Root URL of the object store: file://PATH (relative paths are taken from the working "
        "directory) or s3://BUCKET/PREFIX. Credentials come from the environment, never from here.",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto). Falls back to $AWS_ENDPOINT_URL."
    )
    checkpoints_to_keep: int = Field(2, ge=1, le=100, description="Complete checkpoints kept per stage.")
    keep_checkpoints_after_commit: bool = Field(
        False, description="Keep a stage's resume checkpoints once its output is complete (they hold optimizer "
        "state, about 3x the model)."
    )
    lease_seconds: float = Field(
        600.0, gt=0, description="How long a stage lock stays valid without a heartbeat: a killed holder on "
        "another machine blocks other runs at most this long (one on the same machine, not at all)."
    )

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if "://" not in v:
            v = "file://" + v
        scheme = v.split("://", 1)[0]
        if scheme not in ("file", "s3", "memory"):
            raise ValueError(f"storage.root scheme {scheme!r} is not supported; use file:// or s3://")
        return v


# -------------------------------------------------------------------------------------------------- data


# The steps the data is split between (rlhf_core.stages.registry's SFT, REWARD and RL stage names).
StageName = Literal["sft", "reward", "rl"]
STAGE_NAMES: tuple[StageName, ...] = ("sft", "reward", "rl")


class SourceConfig(Section):
    name: str = Field(
        description="Adapter: a supported dataset name (e.g. 'Dahoas/rm-static', 'Anthropic/hh-rlhf'), "
        "'local/jsonfile' (DeepSpeed-Chat's data/train.json + data/eval.json layout) or 'files' (json/jsonl/"
        "parquet/csv in TRL's or OpenAI's column formats, or any columns with a column mapping)."
    )
    path: str | None = Field(
        None, description="Local path or store URL of the source's files: one file, a folder with train/test "
        "files, or a folder whose subfolders hold them (HH-RLHF's repository). Empty: load `name` from the hub.",
        json_schema_extra=CONTENT_KEYED,
    )
    eval_path: str | None = Field(None, description="A separate eval file (instead of the layout's own eval "
                                  "split, or of carving data.eval_fraction out of train); needs path.",
                                  json_schema_extra=CONTENT_KEYED)
    format: Literal["auto", "json", "jsonl", "parquet", "csv"] = Field(
        "auto", description="File format of the source's files; 'auto' goes by the extension (after a "
        "compression suffix: train.jsonl.gz is jsonl)."
    )
    compression: Literal["auto", "none", "gzip", "bz2", "xz", "zstd"] = Field(
        "auto", description="Compression of the source's files; 'auto' goes by the extension (.gz, .bz2, .xz, "
        ".zst), 'none' reads them as they are."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="For 'files': canonical column (prompt, chosen, rejected) -> column in the file. Empty: the "
        "file's own columns in one of TRL's or OpenAI's formats (prompt/chosen/rejected as text or messages, "
        "chosen/rejected transcripts or conversations, prompt/completion, prompt only, messages).",
    )
    subset: str | None = Field(None, description="Hub dataset configuration name (for Anthropic/hh-rlhf its "
                               "folder, e.g. harmless-base); with path, that subfolder of path.")
    stages: list[StageName] = Field(
        list(STAGE_NAMES), min_length=1,
        description="The steps this source feeds; its rows are split between them in the proportions of "
        "data.split. [sft] is DeepSpeed-Chat's --sft_only_data_path; prompt-only data needs [rl].",
    )
    weight: float | None = Field(
        None, gt=0, description="Share of this source in each blended train set, relative to the other sources' "
        "weights. Unset on every source: each source's share is its size (every row used once, as DeepSpeed-Chat "
        "concatenates). Give every source a weight or none."
    )
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows of the source.")
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="A malformed row fails the stage ('error') or its bad part is dropped and counted "
        "('drop': a bad pair keeps the row for sft and rl, a bad answer keeps its prompt for rl)."
    )

    @model_validator(mode="after")
    def _eval_path_needs_path(self) -> "SourceConfig":
        if self.eval_path and not self.path:
            raise ValueError("eval_path needs path: a source loaded from the hub uses the hub's eval split")
        return self

    @field_validator("columns")
    @classmethod
    def _canonical_columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"prompt", "chosen", "rejected"}
        if unknown:
            raise ValueError(f"columns keys must be prompt, chosen, rejected; got {sorted(unknown)}")
        shared = sorted({c for c in v.values() if list(v.values()).count(c) > 1})
        if shared:
            both = sorted(k for k, c in v.items() if c in shared)
            raise ValueError(f"columns maps {' and '.join(both)} to the same column {shared[0]!r}; each needs its "
                             "own column (for whole transcripts in chosen/rejected, leave columns out: they are "
                             "split at the last Assistant turn)")
        return v

    @field_validator("stages")
    @classmethod
    def _distinct_stages(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"stages lists a step twice: {v}")
        return [s for s in STAGE_NAMES if s in v]


class BlendTotalConfig(Section):
    sft: int | None = Field(None, ge=1, description="Rows of the blended SFT train set (sources over- or "
                            "undersampled to their shares); default: the sum of its sources' rows.")
    reward: int | None = Field(None, ge=1, description="Rows of the blended reward train set; default: the sum "
                               "of its sources' rows.")
    rl: int | None = Field(None, ge=1, description="Prompts of the blended RL train set; default: the sum of its "
                           "sources' prompts.")


class PtxConfig(Section):
    path: str | None = Field(None, description="Plain-text corpus for the pretraining-mixture loss.",
                             json_schema_extra=CONTENT_KEYED)
    block_tokens: int = Field(64, ge=8, description="Corpus is cut into blocks of this many tokens.")
    max_blocks: int | None = Field(None, ge=1, description="Use at most this many blocks.")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1, description="The datasets to unify, split and blend.")
    split: tuple[int, int, int] = Field(
        (2, 4, 4), description="Shares of each source for SFT, reward and PPO (DeepSpeed-Chat's '2,4,4')."
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share for sources with no eval split.")
    max_prompt_tokens: int = Field(
        256, ge=1, description="PPO prompts longer than this (in actor tokens) are dropped and counted."
    )
    prompt_format: PromptFormat = Field(
        "human_assistant",
        description="How prompts reach the models: DeepSpeed-Chat's ' Human: ... Assistant:' text, or the "
        "actor tokenizer's chat template.",
    )
    split_scheme: Literal["default", "deepspeed_chat"] = Field(
        "default", description="How rows are assigned to steps: 'default' (a seeded shuffle of each source's "
        "valid rows cut at rounded cumulative shares) or 'deepspeed_chat' (exactly the rows DeepSpeed-Chat's "
        "data_utils puts in each step for the same seed and split)."
    )
    blend_total: BlendTotalConfig = Field(
        default_factory=BlendTotalConfig, description="Sizes of the blended train sets (default scheme only)."
    )
    seed: int = Field(1234, description="Seed for splitting and blending.")
    ptx: PtxConfig = Field(default_factory=PtxConfig, description="The pretraining corpus (PPO-ptx, SFT mixture).")

    @field_validator("split", mode="before")
    @classmethod
    def _parse_split(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = tuple(int(p) for p in v.split(","))
            except ValueError as e:
                raise ValueError(f"split must be three integers like '2,4,4', got {v!r}") from e
        return v

    @field_validator("split")
    @classmethod
    def _split_non_negative(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(p < 0 for p in v) or sum(v) == 0:
            raise ValueError(f"split shares must be >= 0 with a positive sum, got {','.join(map(str, v))}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _blend_was_replaced(cls, v: Any) -> Any:
        if isinstance(v, dict) and "blend" in v:
            raise ValueError("data.blend was removed: sources are concatenated (every row used once, as "
                             "DeepSpeed-Chat does) unless they have weights; see data.sources.N.weight and "
                             "data.blend_total")
        return v

    @model_validator(mode="after")
    def _blend_and_stages(self) -> "DataConfig":
        weighted = [i for i, s in enumerate(self.sources) if s.weight is not None]
        if weighted and len(weighted) < len(self.sources):
            unset = next(i for i, s in enumerate(self.sources) if s.weight is None)
            raise ValueError(f"data.sources.{weighted[0]}.weight is set but data.sources.{unset}.weight is not; "
                             "give every source a weight, or none (each source's share is then its size)")
        if self.split_scheme == "deepspeed_chat":
            totals = {k: v for k, v in self.blend_total.model_dump().items() if v is not None}
            if weighted or totals:
                what = f"data.sources.{weighted[0]}.weight" if weighted else f"data.blend_total.{next(iter(totals))}"
                raise ValueError(f"{what} cannot be used with split_scheme deepspeed_chat: DeepSpeed-Chat "
                                 "concatenates its sources; remove it or use split_scheme: default")
        shares = dict(zip(STAGE_NAMES, self.split))
        for i, s in enumerate(self.sources):
            if not any(shares[stage] for stage in s.stages):
                raise ValueError(f"data.sources.{i} feeds {', '.join(s.stages)}, whose share in data.split "
                                 f"{','.join(map(str, self.split))} is 0: it would feed nothing; give one of them a "
                                 "share or change the source's stages")
        return self


# ------------------------------------------------------------------------------------------------ models


class ModelSpec(Section):
    name_or_path: str | None = Field(
        None, description="Hub name, local path, or store URL of a pretrained model.", json_schema_extra=CONTENT_KEYED
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="Build a randomly initialised model from this transformers config (must name "
        "model_type); used by the tiny profile and the benchmarks.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer name or path; default: name_or_path.",
                                  json_schema_extra=CONTENT_KEYED)
    pad_token: str | None = Field(
        None, description="Pad token to use when the tokenizer has none: a token string, or 'eos'."
    )
    init_seed: int = Field(0, description="Seed of the random initialisation (architecture models).")
    revision: str | None = Field(None, description="Hub revision.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository to run.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("give exactly one of name_or_path (pretrained) or architecture (from config)")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture must contain model_type (e.g. 'opt', 'llama')")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("a model built from architecture needs an explicit tokenizer")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


class ModelsConfig(Section):
    actor: ModelSpec = Field(description="The policy: SFT trains it, PPO improves it, the reference is a frozen copy.")
    reward: ModelSpec = Field(description="The reward model's base; PPO's critic starts from the trained reward model.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train low-rank adapters (peft) instead of, or beside, the weights.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Adapter scaling numerator: the update is alpha / r * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="Names of the linear layers that get adapters.")
    only_optimize_lora: bool = Field(True, description="Freeze the base weights and train only LoRA.")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters partitioned over ranks.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer state to CPU.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU.")
    precision: Precision = Field("fp32", description="Training precision (bf16 on Ampere and newer GPUs).")
    gradient_clipping: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Passed through into the DeepSpeed config (deep-merged last)."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class OptimizerConfig(Section):
    impl: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="'torch': torch.optim.AdamW (builds no C++ extension); 'deepspeed': DeepSpeed's "
        "FusedAdam / CPUAdam (JIT-built; needed for ZeRO-Offload).",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up, over the stage's optimizer steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to lr over this many steps.")


class TrainStageConfig(Section):
    """Fields shared by the SFT and reward stages."""

    epochs: int = Field(1, ge=1, description="Passes over the stage's training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per process per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=8, description="Prompt + answer tokens kept per sequence (longer ones are cut).")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations (end only if empty).")
    log_every: int = Field(1, ge=1, description="Optimizer steps between rows of the metric history.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward (less memory).")
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout (0 disables it).")
    seed: int = Field(1234, description="Seed of the batch order and of dropout.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer and LR schedule.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="The DeepSpeed engine.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")


class SFTConfig(TrainStageConfig):
    mask_prompt: bool = Field(
        False, description="Train only on answer tokens (DeepSpeed-Chat trains on prompt and answer)."
    )
    ptx_coef: float = Field(
        0.0, ge=0, description="Mix the pretraining corpus (data.ptx) into SFT with this weight: guards a "
        "pretrained base against forgetting, and stands in for pretraining when the actor starts from scratch."
    )


class RewardConfig(TrainStageConfig):
    existing: str | None = Field(
        None,
        description="Use this reward output instead of training one: a key of this store (`<key>` or "
        "`reward/<key>`, as `rlhf store ls` shows it), or the URL of a reward output folder holding manifest.json "
        "(file://... or s3://.../reward/<key>), which is copied into this store. Empty: train the reward model.",
    )
    use_model: bool = Field(
        True, description="Score step-3 answers with the learned reward model (trained in step 2, or reward.existing). "
        "Off: reward.function alone is the reward, and step 3 needs no reward model (PPO still initialises its critic "
        "from one)."
    )
    function: str | None = Field(
        None, description="A rule-based reward, 'package.module:function', called as function(prompt, answer) -> float "
        "on every step-3 answer (prompt: the canonical prompt text; answer: the decoded answer up to its end), alone "
        "(use_model false) or added to the reward model's score (x function_weight, after its normalisation). "
        "Importing it runs that module's code in the step-3 worker: name only code you trust. The step-3 key holds "
        "the module file's content. The bundled task's is rlhf_core.data.tiny_task:gold_reward.",
        json_schema_extra=FUNCTION_KEYED,
    )
    function_weight: float = Field(1.0, description="Weight of reward.function's value in the step-3 reward.")

    @field_validator("function")
    @classmethod
    def _function_spec(cls, v: str | None) -> str | None:
        return function_spec(v, "reward.function")

    @field_validator("existing", mode="before")
    @classmethod
    def _digits_are_a_key(cls, v: Any) -> Any:
        # An override's value is parsed as YAML: a key of only digits arrives as an int (`reward/<key>` does not).
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("existing")
    @classmethod
    def _key_or_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if "://" in v:
            scheme = v.split("://", 1)[0]
            if scheme not in ("file", "s3", "memory"):
                raise ValueError(f"reward.existing URL scheme {scheme!r} is not supported; use file:// or s3://")
            return v.rstrip("/")
        if v.startswith("/"):
            return "file://" + v.rstrip("/")
        if not _REWARD_KEY.fullmatch(v):
            raise ValueError(
                f"reward.existing {v!r} is neither a reward key of this store (20 hex characters, or reward/<key>) "
                "nor a URL of a reward output folder (file:///..., s3://...)"
            )
        return v.removeprefix("reward/")


class ActorCriticTrainConfig(Section):
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer and LR schedule.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="The DeepSpeed engine.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward (less memory).")
    dropout: float | None = Field(0.0, ge=0, lt=1, description="Override the model's dropout (0 disables it; "
                                  "empty keeps the model's own).")


class GenerationConfig(Section):
    max_answer_len: int = Field(256, ge=1, description="New tokens per answer at most.")
    do_sample: bool = Field(True, description="Sample answers (off: greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 disables top-k.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample among the likeliest tokens holding this mass.")

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs of sampled answers are computed at: the sampling temperature when
        sampling (so they describe the distribution the answers came from), 1 when greedy."""
        return self.temperature if self.do_sample else 1.0


class KLConfig(Section):
    coef: float = Field(0.1, ge=0, description="Initial KL coefficient (beta).")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator (Schulman's k1/k2/k3).")
    adaptive: bool = Field(False, description="Adapt coef towards target (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per sequence for the adaptive controller.")
    horizon: int = Field(10000, ge=1, description="Adaptive controller horizon (rollouts per full correction).")
    use_kl_loss: bool = Field(
        False, description="Put the KL in the actor's loss (coef x KL(actor || reference) over the answer tokens, with "
        "this estimator; GRPO's form, OpenRLHF's --use_kl_loss) instead of subtracting it from the rewards."
    )


# Step 3's algorithms (rlhf_core/maths/advantages.py for the estimators; DPO: rlhf_core/trainers/dpo.py).
RLAlgorithm = Literal["ppo", "grpo", "rloo", "reinforce_pp", "dpo"]
ALGORITHM_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++", "dpo": "DPO"}  # for people
# rlhf_core/maths/algos.py's POLICY_LOSSES and LossAgg (the tests check they agree).
PolicyLoss = Literal["ppo_clip", "gspo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PreferenceLossType = Literal["sigmoid", "ipo", "simpo"]


class DPOConfig(Section):
    """rl.algorithm dpo: offline preference optimisation on the reward split's pairs against the frozen SFT model.
    Batches: rl.train_micro_batch_size pairs per process x gradient_accumulation_steps per optimizer step, for
    rl.epochs passes (or rl.max_steps); optimizer, DeepSpeed and LoRA from rl.actor."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference (DPO's beta; SimPO's "
                        "reward scale, where 2-2.5 is usual).")
    loss_type: PreferenceLossType = Field(
        "sigmoid", description="'sigmoid': DPO (Rafailov et al. 2023); 'ipo': IPO (Azar et al. 2023) on per-token mean "
        "log-ratios; 'simpo': SimPO (Meng et al. 2024), length-normalised, no reference model."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO (cDPO): the probability that a "
                                   "pair's label is flipped (sigmoid and simpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    max_seq_len: int = Field(512, ge=8, description="Prompt + answer tokens kept per sequence (longer ones are cut).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations on reward/eval "
                                   "(end only if empty).")
    invert_preferences: bool = Field(False, description="Learn the reverse preference, every pair's chosen and "
                                     "rejected swapped (an ablation control, as rl.reward_scale -1 is for the others).")


class RLConfig(Section):
    algorithm: RLAlgorithm = Field(
        "ppo", description="Step 3's algorithm. 'ppo': DeepSpeed-Chat's PPO (critic, GAE). Critic-free, with "
        "n_samples_per_prompt answers per prompt: 'grpo' (group-normalised scores; with norm_adv_by_std false and "
        "loss_agg_mode seq-mean-token-sum-norm, Dr.GRPO), 'rloo' (leave-one-out baseline), 'reinforce_pp' "
        "(REINFORCE++: scores normalised over the global batch; minus the group mean when n > 1). 'dpo': offline "
        "preference optimisation on the reward split's pairs (rl.dpo), no rollouts and no reward model."
    )
    n_samples_per_prompt: int = Field(
        1, ge=1, le=1024, description="Answers sampled per prompt (a group; GRPO and RLOO need 2 or more). Each "
        "generation batch holds rollout_batch_size prompts x this many answers."
    )
    policy_loss: PolicyLoss = Field(
        "ppo_clip", description="'ppo_clip': the clipped surrogate with per-token ratios; 'gspo': one ratio per "
        "answer (GSPO, Zheng et al. 2025; use a small clip_range such as 3e-4)."
    )
    loss_agg_mode: LossAgg = Field(
        "token-mean", description="How per-token losses (policy, KL) become one number: 'token-mean' over every "
        "answer token (DeepSpeed-Chat); 'seq-mean-token-mean', the mean of each answer's mean (GRPO's paper); "
        "'seq-mean-token-sum-norm', each answer's sum over generation.max_answer_len (Dr.GRPO: no length bias)."
    )
    norm_adv_by_std: bool = Field(True, description="GRPO: divide by the group's score std (off: Dr.GRPO).")
    whiten_advantages: bool | None = Field(
        None, description="Normalise advantages to mean 0, std 1 over all ranks' answer tokens. Empty: the "
        "algorithm's own choice (ppo and reinforce_pp yes, grpo and rloo no: their group baselines already centre them)."
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO's settings (rl.algorithm dpo).")
    epochs: int = Field(1, ge=1, description="Passes over the step-3 prompts (dpo: over the preference pairs).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (dpo: optimizer steps).")
    rollout_batch_size: int = Field(16, ge=1, description="Prompts per generation batch per process.")
    generation_batches: int = Field(1, ge=1, description="Generation batches collected per PPO step.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's experience.")
    old_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute", description="The actor's log-probs at sampling time. 'recompute': a forward of the actor "
        "over each rollout (DeepSpeed-Chat); 'rollout': the log-probs the hybrid engine's fast path computed "
        "while sampling (one actor forward fewer per step; they differ from a forward by bf16 rounding, which "
        "benchmarks/step3_throughput.py reports). Falls back to 'recompute' where generation took another path."
    )
    train_micro_batch_size: int = Field(16, ge=1, description="Experience rows (answers) per training micro-batch "
                                        "(dpo: preference pairs).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Rollout sampling.")
    kl: KLConfig = Field(default_factory=KLConfig, description="The KL penalty against the reference model.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per answer token (GAE).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 Monte-Carlo returns, 0 one-step TD.")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    reward_clip: float = Field(5.0, gt=0, description="Clip the reward-model score to [-x, x].")
    normalize_reward: bool = Field(False, description="Normalise scores by the reward model's stored mean/std.")
    reward_scale: float = Field(
        1.0, description="Multiplies the score; a negative value inverts the reward (an ablation control)."
    )
    actor: ActorCriticTrainConfig = Field(default_factory=ActorCriticTrainConfig, description="Training the actor.")
    critic: ActorCriticTrainConfig = Field(default_factory=ActorCriticTrainConfig, description="Training the critic "
                                           "(ppo); its DeepSpeed settings also place the frozen reward model.")
    placement: Literal["auto", "manual"] = Field(
        "auto", description="Where the frozen reference and reward models live. 'auto': on the accelerator while "
        "they fit its measured free memory (beside the trained engines and room for generation and training), in "
        "host memory only when they do not; 'manual': exactly as offload_reference / offload_reward say. A flag set "
        "to true wins either way. With a LoRA actor whose base weights are frozen the reference is the actor with "
        "its adapters switched off: no second copy at all."
    )
    offload_reference: bool = Field(False, description="Keep the frozen reference model in host memory between uses.")
    offload_reward: bool = Field(False, description="Keep the frozen reward model in host memory between uses.")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(1, ge=1, description="Steps between rows of the metric history.")
    seed: int = Field(1234, description="Seed of the prompt order, minibatch order and sampling.")

    @property
    def advantage_estimator(self) -> str:
        """The advantage estimator's name in rlhf_core.maths.advantages (PPO's is GAE)."""
        return "gae" if self.algorithm == "ppo" else self.algorithm

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def whiten(self) -> bool:
        """Whether advantages are normalised over the global batch (whiten_advantages, or the algorithm's own)."""
        if self.whiten_advantages is not None:
            return self.whiten_advantages
        return self.algorithm in ("ppo", "reinforce_pp")

    @property
    def rows_per_step(self) -> int:
        """Answers per step per process: prompts x generation batches x samples per prompt."""
        return self.rollout_batch_size * self.generation_batches * self.n_samples_per_prompt

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "RLConfig":
        if self.algorithm in ("grpo", "rloo") and self.n_samples_per_prompt < 2:
            raise ValueError(
                f"rl.algorithm {self.algorithm} compares the answers to one prompt, but rl.n_samples_per_prompt is "
                f"{self.n_samples_per_prompt}; set it to 2 or more (4 to 16 is usual)"
            )
        if self.algorithm == "dpo":
            return self
        if self.rows_per_step % self.train_micro_batch_size:
            raise ValueError(
                f"rollout_batch_size x generation_batches x n_samples_per_prompt ({self.rows_per_step}) must be a "
                f"multiple of train_micro_batch_size ({self.train_micro_batch_size}); change one of them"
            )
        return self


class EMAConfig(Section):
    enabled: bool = Field(True, description="Keep an exponential moving average of the actor (exported as 'ema').")
    beta: float = Field(0.992, ge=0, le=1, description="ema = beta * ema + (1 - beta) * actor")
    on_cpu: bool = Field(False, description="Keep the EMA weights on CPU (saves accelerator memory).")


class MixtureConfig(Section):
    ptx_coef: float = Field(0.0, ge=0, description="Weight of the pretraining next-token loss in the actor update.")
    ptx_batch_size: int = Field(8, ge=1, description="Corpus blocks per actor micro-batch.")


class HybridEngineConfig(Section):
    enabled: bool = Field(
        True, description="Fast generation path for OPT and Llama actors (a static-shape decoder with a KV cache); "
        "off, or for other architectures: plain transformers generate."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Generation weight dtype; 'auto' is bf16 on CUDA and fp32 on CPU."
    )
    cuda_graphs: bool = Field(True, description="Capture the decode step in a CUDA graph (CUDA only).")
    kv_bucket: int = Field(
        128, ge=8, le=4096, description="Decode steps attend over the KV cache in buckets of this many positions (one "
        "CUDA graph per bucket): smaller buckets read less unused cache per step, larger ones capture fewer graphs."
    )
    max_batch: int = Field(
        512, ge=1, description="Most rows the fast path decodes at once: a larger rollout batch is generated in "
        "chunks of this many rows (the KV cache is sized to one chunk)."
    )
    release_memory: bool = Field(
        True, description="Free the fast path's weights, KV cache and graphs after every rollout, before training "
        "resumes; off keeps them for the next rollout (no reload or recapture, but held through training)."
    )


# Names eval.gold_reward accepted before it took a function reference.
_GOLD_ALIASES = {"none": None, "tiny_task": "rlhf_core.data.tiny_task:gold_reward"}


class EvalConfig(Section):
    gold_reward: str | None = Field(
        None, description="A programmatic gold reward to report beside the learned one, 'package.module:function' "
        "called as function(prompt, answer) -> float (the bundled task's: rlhf_core.data.tiny_task:gold_reward; "
        "'tiny_task' is accepted for it). Evaluation then also reports win rates judged by it. Importing it runs that "
        "module's code: name only code you trust. Keys hold the module file's content.",
        json_schema_extra=FUNCTION_KEYED,
    )
    reward_model: bool = Field(
        True, description="Score the evaluation's answers with the reward model (reward score, win rate by it). Off: "
        "evaluation needs no reward model (with rl.algorithm dpo or reward.use_model false, the run then trains none)."
    )
    num_prompts: int = Field(64, ge=1, description="Held-out PPO prompts to sample from.")
    max_answer_len: int | None = Field(None, ge=1, description="Default: rl.generation.max_answer_len.")
    do_sample: bool = Field(False, description="Sample the evaluation answers (off: greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    samples_in_report: int = Field(8, ge=0, description="Prompts shown with every model's answer in report.md.")
    ptx_blocks: int = Field(64, ge=1, description="Corpus blocks for the pretraining perplexity.")
    seed: int = Field(4321, description="Sampling seed; every model samples with the same one.")

    @field_validator("gold_reward", mode="before")
    @classmethod
    def _gold_alias(cls, v: Any) -> Any:
        return _GOLD_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("gold_reward")
    @classmethod
    def _gold_spec(cls, v: str | None) -> str | None:
        return function_spec(v, "eval.gold_reward")


class ExportConfig(Section):
    dtype: Precision = Field("fp32", description="Weight dtype of the exported final and EMA actors.")


class ResourcesConfig(Section):
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where stages compute.")
    nnodes: int = Field(1, ge=1, description="Machines a training stage runs on.")
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per machine.")
    launcher: Literal["inprocess", "subprocess", "torchrun", "deepspeed"] = Field(
        "subprocess",
        description="How a stage runs: in the Prefect worker process, as one subprocess, or N processes "
        "through torchrun / the DeepSpeed launcher (multi-node via hostfile).",
    )
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node runs.")
    master_addr: str = Field("127.0.0.1", description="Address of rank 0 for torch.distributed.")
    master_port: int | None = Field(None, ge=1024, le=65535, description="Default: a free port.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads per process.")
    gpu_slots: int = Field(
        0, ge=0, le=1024, description="Slots a training stage holds in Prefect's global concurrency limit "
        "'rlhf-gpu' (sized to the machine's GPUs by `rlhf serve --gpus N`), so that concurrent runs queue instead "
        "of oversubscribing the GPUs; usually nnodes x nproc_per_node on a shared machine. 0: no gating.",
    )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @model_validator(mode="after")
    def _launcher_fits(self) -> "ResourcesConfig":
        if self.world_size > 1 and self.launcher in ("inprocess", "subprocess"):
            raise ValueError(
                f"{self.world_size} processes need launcher torchrun or deepspeed, not {self.launcher!r}"
            )
        if self.nnodes > 1 and self.launcher == "deepspeed" and not self.hostfile:
            raise ValueError("a multi-node deepspeed launch needs resources.hostfile")
        return self


class LoggingConfig(Section):
    """Where training curves go besides the stage output (its logs/: metrics.jsonl, TensorBoard events,
    curves.png). No output depends on it, so no cache key holds it."""

    wandb: bool = Field(
        False, description="Also log each training stage's metrics to Weights & Biases when the wandb package is "
        "installed (pip install rlhf-flow[wandb]); RLHF_WANDB=1 or 0 in the environment overrides this. "
        "Credentials come from wandb's own login or WANDB_API_KEY, never from the config, and are never logged."
    )
    wandb_project: str = Field("rlhf-flow", min_length=1, description="W&B project of the runs (one run per stage "
                               "attempt, grouped by the stage's key).")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); default: the login's.")


class ScheduleConfig(Section):
    """When `rlhf serve` starts the pipeline on its own; `--cron` / `--interval` on the command line win."""

    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * *' (03:00 every day).")
    interval_seconds: float | None = Field(None, ge=60, description="Start a run every this many seconds.")
    timezone: str = Field("UTC", description="Time zone of the cron expression (IANA name).")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) not in (5, 6):
            raise ValueError(f"cron {v!r} must have 5 fields (minute hour day month weekday), e.g. '0 3 * * *'")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "ScheduleConfig":
        if self.cron is not None and self.interval_seconds is not None:
            raise ValueError("give schedule.cron or schedule.interval_seconds, not both")
        return self


# -------------------------------------------------------------------------------------------------- root


class PipelineConfig(Section):
    name: str = Field("rlhf", description="The profile's name, for people (Prefect names runs after the profile "
                      "and its overrides); no stage reads it.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where outputs and checkpoints go.")
    data: DataConfig = Field(description="Step 0: sources, split, blending, the pretraining corpus.")
    models: ModelsConfig = Field(description="The actor and the reward model's base.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Step 1: supervised fine-tuning of the actor.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Step 2: the reward model.")
    rl: RLConfig = Field(default_factory=RLConfig, description="Step 3: reinforcement learning of the actor.")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="The EMA of the actor during step 3.")
    mixture: MixtureConfig = Field(default_factory=MixtureConfig, description="The pretraining loss in step 3.")
    hybrid_engine: HybridEngineConfig = Field(default_factory=HybridEngineConfig,
                                              description="Generation in step 3 and in evaluation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation of the SFT, final and EMA actors.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The exported actors.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Devices, processes, launcher.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Training curves besides the store's "
                                   "(Weights & Biases).")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="When `rlhf serve` starts runs.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        for key, coef in (("mixture.ptx_coef", self.mixture.ptx_coef), ("sft.ptx_coef", self.sft.ptx_coef)):
            if coef > 0 and not self.data.ptx.path:
                raise ValueError(f"{key} > 0 needs data.ptx.path (a plain-text corpus)")
        if self.rl.algorithm != "dpo" and not self.reward.use_model and self.reward.function is None:
            raise ValueError(f"rl.algorithm {self.rl.algorithm} needs a reward: set reward.function (a rule, "
                             "package.module:function) or reward.use_model true (the learned reward model)")
        if not self.eval.reward_model and self.eval.gold_reward is None:
            raise ValueError("eval.reward_model false leaves evaluation nothing to score answers with; set "
                             "eval.gold_reward (package.module:function) or eval.reward_model true")
        if self.data.max_prompt_tokens + self.rl.generation.max_answer_len > _max_positions(self.models.actor):
            raise ValueError(
                f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rl.generation.max_answer_len "
                f"({self.rl.generation.max_answer_len}) exceeds the actor's "
                f"{_max_positions(self.models.actor)} positions; lower one of them"
            )
        return self


def _max_positions(spec: ModelSpec) -> int:
    arch = spec.architecture or {}
    return int(arch.get("max_position_embeddings", 1 << 30))
