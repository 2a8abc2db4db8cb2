"""The actor and reference model: any causal LM, from a hub name, path or store URL, or built from a config;
saved as a plain Hugging Face folder (LoRA merged, safetensors)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from rlhf_core.config import ModelSpec
from rlhf_core.models.loading import ModelLoadError, build_config, fit_vocab, partitioned, seeded, set_dropout
from rlhf_core.models.lora import merge_lora
from rlhf_core.storage.store import local_copy


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
        with seeded(spec.init_seed):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        fit_vocab(model, tokenizer)
        return model
    with partitioned(partition_with):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                local_copy(spec.name_or_path), config=config, dtype=dtype, revision=spec.revision,
                trust_remote_code=spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"models.{role}: cannot load {spec.name_or_path!r} ({type(e).__name__}: {e})") from None
        fit_vocab(model, tokenizer)
    return model


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, dropout: float | None = None, what: str = "model",
                   partition_with: dict[str, Any] | None = None):
    """A causal LM saved by this project (or any HF folder); ``partition_with`` as in ``build_causal_lm``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    local = local_copy(path)
    try:
        config = AutoConfig.from_pretrained(local)
        set_dropout(config, dropout)
        with partitioned(partition_with):
            return AutoModelForCausalLM.from_pretrained(local, config=config, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load {what} from {path} ({type(e).__name__}: {e})") from None


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
