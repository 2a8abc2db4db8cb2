"""Tokenizers and models: the actor (any causal LM), the reward model / critic (a backbone with a scalar
value head), LoRA through peft, and saving / loading them as plain Hugging Face folders (safetensors)."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from rlhf_core.config import LoraConfig, ModelSpec
from rlhf_core.store import local_copy

VALUE_HEAD = "value_head.safetensors"
REWARD_META = "reward_model.json"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and where."""


# ------------------------------------------------------------------------------------------ tokenizers


def load_tokenizer(spec: ModelSpec, role: str = "actor", padding_side: str = "right"):
    """The tokenizer of a model spec, with a pad token (from the spec when the tokenizer has none)."""
    from transformers import AutoTokenizer

    ref = spec.tokenizer_path
    try:
        tok = AutoTokenizer.from_pretrained(
            local_copy(ref), revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as e:  # OSError, ValueError, HTTP errors...
        raise ModelLoadError(f"models.{role}: cannot load tokenizer {ref!r} ({type(e).__name__}: {e})") from None
    if tok.pad_token is None:
        if spec.pad_token is None:
            raise ModelLoadError(
                f"models.{role}: tokenizer {ref!r} has no pad token; set models.{role}.pad_token "
                "(e.g. 'eos' to pad with the end-of-sequence token)"
            )
        token = tok.eos_token if spec.pad_token == "eos" else spec.pad_token
        if token is None or tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
            raise ModelLoadError(f"models.{role}.pad_token {spec.pad_token!r} is not in the vocabulary of {ref!r}")
        tok.pad_token = token
    if tok.eos_token is None:
        raise ModelLoadError(f"models.{role}: tokenizer {ref!r} has no end-of-sequence token; answers could never end")
    tok.padding_side = padding_side
    return tok


def load_saved_tokenizer(path: str, padding_side: str = "right"):
    """The tokenizer a stage saved next to its model (it already carries the pad token chosen then)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_copy(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer saved in {path} ({type(e).__name__}: {e})") from None
    if tok.pad_token is None:
        raise ModelLoadError(f"the tokenizer saved in {path} has no pad token")
    tok.padding_side = padding_side
    return tok


# ----------------------------------------------------------------------------------------------- configs

_DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                 "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")


def _set_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in _DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def build_config(spec: ModelSpec, tokenizer, dropout: float | None = None, role: str = "actor"):
    """The transformers config of a model spec, with the tokenizer's special ids and a vocabulary that fits."""
    from transformers import AutoConfig

    if spec.architecture is not None:
        arch = dict(spec.architecture)
        model_type = arch.pop("model_type")
        # Round the vocabulary up to a multiple of 8 (DeepSpeed-Chat does the same when resizing).
        arch.setdefault("vocab_size", int(8 * math.ceil(len(tokenizer) / 8)))
        config = AutoConfig.for_model(model_type, **arch)
    else:
        try:
            config = AutoConfig.from_pretrained(local_copy(spec.name_or_path), revision=spec.revision,
                                                trust_remote_code=spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"models.{role}: cannot load {spec.name_or_path!r} ({type(e).__name__}: {e})") from None
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    _set_dropout(config, dropout)
    return config


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without disturbing the caller's RNG streams."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _partitioned(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Pretrained weights loaded inside are partitioned across the ranks as they load when ``ds_config`` is a
    ZeRO-3 DeepSpeed config (DeepSpeed's ``zero.Init`` through transformers' ``HfDeepSpeedConfig``; rank 0
    reads the files), so no rank ever holds a whole copy in host or device memory. Otherwise nothing."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def _fit_vocab(model, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 construction the local shape is (0,)
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8)))


# ----------------------------------------------------------------------------------------------- actors


def build_causal_lm(spec: ModelSpec, tokenizer, dropout: float | None = None, dtype: torch.dtype = torch.float32,
                    role: str = "actor", partition_with: dict[str, Any] | None = None):
    """The actor / reference: from a hub name, local path or store URL, or random-init from architecture.

    partition_with: the DeepSpeed config of the engine the model goes into; under ZeRO-3 pretrained weights
    are partitioned as they load. A random-init architecture is always built whole: zero.Init draws other
    random values, and the same seed must give the same model at every ZeRO stage.
    """
    from transformers import AutoModelForCausalLM

    config = build_config(spec, tokenizer, dropout, role)
    if spec.architecture is not None:
        with _seeded(spec.init_seed):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _fit_vocab(model, tokenizer)
        return model
    with _partitioned(partition_with):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                local_copy(spec.name_or_path), config=config, dtype=dtype, revision=spec.revision,
                trust_remote_code=spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"models.{role}: cannot load {spec.name_or_path!r} ({type(e).__name__}: {e})") from None
        _fit_vocab(model, tokenizer)
    return model


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, dropout: float | None = None, what: str = "model",
                   partition_with: dict[str, Any] | None = None):
    """A causal LM saved by this project (or any HF folder); ``partition_with`` as in ``build_causal_lm``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    local = local_copy(path)
    try:
        config = AutoConfig.from_pretrained(local)
        _set_dropout(config, dropout)
        with _partitioned(partition_with):
            return AutoModelForCausalLM.from_pretrained(local, config=config, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load {what} from {path} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------- reward/critic


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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row ([B, T] -> [B]); works for left and right padding.

    Equals ``[max(i for i in range(T) if mask[b, i]) for b in range(B)]``.
    """
    T = attention_mask.shape[1]
    flipped_first = attention_mask.flip(-1).to(torch.int64).argmax(-1)
    return T - 1 - flipped_first


def sequence_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T], attention_mask [B, T] -> values at the last real token [B]."""
    idx = last_token_index(attention_mask)
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
        with _seeded(spec.init_seed):
            backbone = AutoModel.from_config(config, dtype=dtype)
            model = RewardModel(backbone)
        _fit_vocab(backbone, tokenizer)
        return _cast_head(model, dtype)
    with _partitioned(partition_with):
        try:
            backbone = AutoModel.from_pretrained(local_copy(spec.name_or_path), config=config, dtype=dtype,
                                                 revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"models.{role}: cannot load {spec.name_or_path!r} ({type(e).__name__}: {e})") from None
        _fit_vocab(backbone, tokenizer)
    with _seeded(spec.init_seed):
        model = RewardModel(backbone)
    return _cast_head(model, dtype)


def save_reward_model(model: RewardModel, tokenizer, path: str, meta: dict[str, Any]) -> None:
    """Backbone as an HF folder, the head as safetensors, score statistics and settings as JSON."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.backbone.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    save_file({"weight": model.v_head.weight.detach().cpu().contiguous()}, os.path.join(path, VALUE_HEAD))
    with open(os.path.join(path, REWARD_META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


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
        _set_dropout(config, dropout)
        with _partitioned(partition_with):
            backbone = AutoModel.from_pretrained(local, config=config, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load the reward model backbone from {path} ({type(e).__name__}: {e})") from None
    model = RewardModel(backbone)
    model.v_head.weight.data.copy_(load_file(os.path.join(local, VALUE_HEAD))["weight"])
    meta = reward_meta(local)
    model.score_mean.fill_(meta.get("score_mean", 0.0))
    model.score_std.fill_(meta.get("score_std", 1.0))
    return _cast_head(model, dtype)


def reward_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(local_copy(path), REWARD_META)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ LoRA


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap a causal LM (or a RewardModel's backbone) with LoRA adapters.

    only_optimize_lora: base weights frozen, adapters (and a value head) trained; otherwise all trained.
    """
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), bias="none")
    target = model.backbone if isinstance(model, RewardModel) else model
    try:
        wrapped = get_peft_model(target, peft_cfg)
    except ValueError as e:
        raise ModelLoadError(f"LoRA target_modules {lora.target_modules} do not match the model ({e})") from None
    if not lora.only_optimize_lora:
        for p in wrapped.parameters():
            p.requires_grad_(True)
    if isinstance(model, RewardModel):
        model.backbone = wrapped
        model.v_head.weight.requires_grad_(True)
        return model
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights (a no-op for a model without them)."""
    from peft import PeftModel

    if isinstance(model, RewardModel):
        if isinstance(model.backbone, PeftModel):
            model.backbone = model.backbone.merge_and_unload()
        return model
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    target = model.backbone if isinstance(model, RewardModel) else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "config"):
        target.config.use_cache = False


def for_training(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool) -> nn.Module:
    """A loaded actor / reward model / critic as a stage trains it: LoRA adapters, then activation checkpointing."""
    model = apply_lora(model, lora)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def save_causal_lm(model: nn.Module, tokenizer, path: str, dtype: torch.dtype | None = None,
                   card: str | None = None) -> None:
    """A plain HF folder that ``AutoModelForCausalLM.from_pretrained`` loads (LoRA merged, safetensors)."""
    model = merge_lora(model)
    if dtype is not None:
        model = model.to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if card:
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(card)
