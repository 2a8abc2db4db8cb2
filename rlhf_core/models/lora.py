"""LoRA adapters through peft, and activation checkpointing: a loaded model as a stage trains it."""

from __future__ import annotations

from torch import nn

from rlhf_core.config import LoraConfig
from rlhf_core.models.loading import ModelLoadError
from rlhf_core.models.reward_model import RewardModel


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
