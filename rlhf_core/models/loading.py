"""What loading any model shares: errors, dtype names, transformers configs with this project's dropout and
special ids, seeded initialisation, and partitioning pretrained weights as they load under ZeRO-3."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from rlhf_core.config import ModelSpec
from rlhf_core.storage.store import local_copy

# The config's precision names (DeepSpeedConfig.precision, ExportConfig.dtype, HybridEngineConfig.dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``'bf16'`` -> ``torch.bfloat16``; the one map from the config's precision names to torch dtypes."""
    return DTYPES[name]


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and where."""


DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                 "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")


def set_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in DROPOUT_KEYS:
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
    set_dropout(config, dropout)
    return config


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without disturbing the caller's RNG streams."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def partitioned(ds_config: dict[str, Any] | None) -> Iterator[None]:
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


def fit_vocab(model, tokenizer) -> None:
    weight = model.get_input_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 construction the local shape is (0,)
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8)))
