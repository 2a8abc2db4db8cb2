"""The reward model and critic: a transformer backbone with a scalar value head, saved as an HF folder plus
the head (safetensors) and its metadata (``RewardMeta``, JSON)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from rlhf_core.config import ModelSpec
from rlhf_core.config.schema import PromptFormat
from rlhf_core.maths.algos import last_index
from rlhf_core.models.loading import ModelLoadError, build_config, fit_vocab, partitioned, seeded, set_dropout
from rlhf_core.storage.store import local_copy

VALUE_HEAD = "value_head.safetensors"


REWARD_META = "reward_model.json"


class RewardModel(nn.Module):
    """A transformer backbone with a scalar value head: a value per token, and a sequence's score as the
    value at its last real token.

    "Last real token" comes from the attention mask, so left and right padding both work, and so does OPT's
    leading token whose id equals a pad/BOS id (DeepSpeed-Chat had to skip it by id with
    ``num_padding_at_beginning``): its mask is 1, so it is never mistaken for padding.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        hidden = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.v_head = nn.Linear(hidden, 1, bias=False)
        self.register_buffer("score_mean", torch.zeros(()), persistent=False)
        self.register_buffer("score_std", torch.ones(()), persistent=False)

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Args: input_ids, attention_mask, optional position_ids [B, T]. Returns: values [B, T] (float32)."""
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        return self.v_head(hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Returns: scores [B], the value at each sequence's last real token."""
        return sequence_scores(self(input_ids, attention_mask), attention_mask)


def sequence_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T], attention_mask [B, T] -> values at the last real token [B]."""
    idx = last_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def _cast_head(model: RewardModel, dtype: torch.dtype) -> RewardModel:
    """The value head (and score statistics) in ``dtype``; the backbone was loaded in it already, and a
    ZeRO-3-partitioned backbone must not be cast by ``Module.to``."""
    model.v_head.to(dtype)
    model.score_mean.data = model.score_mean.data.to(dtype)
    model.score_std.data = model.score_std.data.to(dtype)
    return model


def build_reward_model(spec: ModelSpec, tokenizer, dropout: float | None = None, dtype: torch.dtype = torch.float32,
                       role: str = "reward", partition_with: dict[str, Any] | None = None) -> RewardModel:
    """A reward model with a fresh value head; ``partition_with`` as in ``build_causal_lm``."""
    from transformers import AutoModel

    config = build_config(spec, tokenizer, dropout, role)
    if spec.architecture is not None:
        with seeded(spec.init_seed):
            backbone = AutoModel.from_config(config, dtype=dtype)
            model = RewardModel(backbone)
        fit_vocab(backbone, tokenizer)
        return _cast_head(model, dtype)
    with partitioned(partition_with):
        try:
            backbone = AutoModel.from_pretrained(local_copy(spec.name_or_path), config=config, dtype=dtype,
                                                 revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"models.{role}: cannot load {spec.name_or_path!r} ({type(e).__name__}: {e})") from None
        fit_vocab(backbone, tokenizer)
    with seeded(spec.init_seed):
        model = RewardModel(backbone)
    return _cast_head(model, dtype)


class RewardMeta(BaseModel):
    """What a reward model's users need besides its weights (``reward_model.json`` beside them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_mean: float = Field(description="Mean score over the held-out pairs (PPO's optional normalisation).")
    score_std: float = Field(description="Score standard deviation over the held-out pairs.")
    max_seq_len: int = Field(description="Tokens it was trained on; scoring keeps the last this many.")
    prompt_format: PromptFormat = Field(description="How its prompts were rendered.")
    eval_accuracy: float = Field(description="Held-out pairwise accuracy.")


def save_reward_model(model: RewardModel, tokenizer, path: str, meta: RewardMeta, card: str | None = None) -> None:
    """Backbone as an HF folder, the head as safetensors, its metadata as JSON, ``card`` as README.md."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.backbone.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    save_file({"weight": model.v_head.weight.detach().cpu().contiguous()}, os.path.join(path, VALUE_HEAD))
    with open(os.path.join(path, REWARD_META), "w") as f:
        json.dump(meta.model_dump(mode="json"), f, indent=2, sort_keys=True)
    if card:
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(card)


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, dropout: float | None = None,
                      partition_with: dict[str, Any] | None = None) -> RewardModel:
    """A reward model (or a critic initialised from one) saved by ``save_reward_model``; ``partition_with``
    as in ``build_causal_lm`` (the small value head is never partitioned before the engine takes it)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    local = local_copy(path)
    if not os.path.exists(os.path.join(local, VALUE_HEAD)):
        raise ModelLoadError(f"{path} is not a reward model: it has no {VALUE_HEAD}")
    try:
        config = AutoConfig.from_pretrained(local)
        set_dropout(config, dropout)
        with partitioned(partition_with):
            backbone = AutoModel.from_pretrained(local, config=config, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load the reward model backbone from {path} ({type(e).__name__}: {e})") from None
    model = RewardModel(backbone)
    model.v_head.weight.data.copy_(load_file(os.path.join(local, VALUE_HEAD))["weight"])
    meta = reward_meta(local)
    model.score_mean.fill_(meta.score_mean)
    model.score_std.fill_(meta.score_std)
    return _cast_head(model, dtype)


def reward_meta(path: str) -> RewardMeta:
    """The metadata saved beside a reward model (or a critic); a missing or malformed file is an error."""
    file = os.path.join(local_copy(path), REWARD_META)
    try:
        with open(file) as f:
            return RewardMeta.model_validate_json(f.read())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a reward model: it has no {REWARD_META}") from None
    except ValidationError as e:
        raise ModelLoadError(f"{file} is not valid reward-model metadata: {e}") from None
