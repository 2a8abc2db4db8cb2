"""Export: the final and EMA actors as plain Hugging Face models (LoRA already merged, safetensors, the
configured dtype), each with a model card that says where it came from."""

from __future__ import annotations

import os
import tempfile

import torch

from rlhf_core.stages import registry as stages
from rlhf_core.config import PipelineConfig
from rlhf_core.models.causal_lm import load_causal_lm, save_causal_lm
from rlhf_core.models.tokenizers import load_saved_tokenizer
from rlhf_core.storage.store import Manifest, Store

EXPORTS = {"final": "actor", "ema": "actor_ema"}  # exported name -> folder in the PPO output
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_card(name: str, cfg: PipelineConfig, ppo: Manifest) -> str:
    lineage = [f"- data `{ppo.upstream.get(stages.DATA)}`", f"- SFT `{ppo.upstream.get(stages.SFT)}`",
               f"- reward model `{ppo.upstream.get(stages.REWARD)}`", f"- PPO `{ppo.key}` (content {ppo.content_id[:12]})"]
    what = "the final PPO actor" if name == "final" else f"the exponential moving average of the PPO actor (beta {cfg.ema.beta})"
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in ppo.metrics.items() if isinstance(v, float))
    base = cfg.models.actor.name_or_path or f"{cfg.models.actor.architecture.get('model_type')} from config"
    return f"""# {cfg.name}: {name} actor

This is {what}, trained by rlhf-flow with RLHF: SFT, a reward model, then PPO with a KL penalty
(coefficient {cfg.ppo.kl.coef}, estimator {cfg.ppo.kl.estimator}{', adaptive' if cfg.ppo.kl.adaptive else ''}) and a
pretraining-mixture coefficient of {cfg.mixture.ptx_coef}. Base model: `{base}`. LoRA adapters, if any, are
merged: load it with `AutoModelForCausalLM.from_pretrained(path)`. Prompts follow the
`{cfg.data.prompt_format}` format.

## Lineage
{chr(10).join(lineage)}

## PPO training
| metric | value |
|---|---|
{metrics}
"""


def run_export(cfg: PipelineConfig, store: Store, key: str, ppo: Manifest, producer: dict | None = None) -> Manifest:
    existing = store.read_manifest(stages.EXPORT, key)
    if existing is not None:
        return existing
    files = {f.path.split("/")[0] for f in ppo.files}
    dtype = _DTYPES[cfg.export.dtype]
    with store.open_output(stages.EXPORT, key) as out, tempfile.TemporaryDirectory() as tmp:
        exported = {}
        for name, folder in EXPORTS.items():
            if folder not in files:
                continue
            src = store.fetch(ppo.stage, ppo.key, folder)
            model = load_causal_lm(src, what=f"the PPO {name} actor")
            save_causal_lm(model, load_saved_tokenizer(src), os.path.join(tmp, name), dtype=dtype,
                           card=model_card(name, cfg, ppo))
            out.put_dir(os.path.join(tmp, name), name)
            exported[name] = sum(p.numel() for p in model.parameters())
        return out.commit(stage_version=stages.VERSIONS[stages.EXPORT], config=cfg.export.model_dump(mode="json"),
                          upstream={stages.PPO: ppo}, producer=producer,
                          metrics={"models": sorted(exported), "parameters": max(exported.values()), "dtype": cfg.export.dtype})
