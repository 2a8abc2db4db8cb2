"""Export: the final and EMA actors as plain Hugging Face models (LoRA already merged, safetensors, the
configured dtype), each with a model card that says where it came from.

The card is written from the step-3 manifest (its settings view and metrics) and content ids, which the
export's key holds, so the same key gives the same bytes.
"""

from __future__ import annotations

import os

from rlhf_core.config.schema import ALGORITHM_NAMES
from rlhf_core.config.views import ExportSettings
from rlhf_core.models.card import CardMeta, card_metadata, model_card
from rlhf_core.models.causal_lm import load_causal_lm, save_causal_lm
from rlhf_core.models.loading import torch_dtype
from rlhf_core.models.tokenizers import load_saved_tokenizer
from rlhf_core.stages.context import StageContext
from rlhf_core.stages.registry import ACTOR, ACTOR_EMA, EMA, FINAL, MODEL, RL, SFT
from rlhf_core.storage.store import Manifest

EXPORTS = {FINAL: ACTOR, EMA: ACTOR_EMA}  # exported name -> folder in the step-3 output


def about(name: str, rl: Manifest) -> str:
    """The card's paragraph: what this actor is and how step 3 trained it (from its output's settings)."""
    s = rl.config
    algorithm = s["rl"].get("algorithm", "ppo")
    label = ALGORITHM_NAMES[algorithm]
    kl, mix = s["rl"]["kl"], s["mixture"]["ptx_coef"]
    what = (f"the final {label} actor" if name == FINAL else
            f"the exponential moving average of the {label} actor (beta {s['ema']['beta']})")
    if algorithm == "dpo":
        dpo = s["rl"]["dpo"]
        how = (f"SFT, then {label} on preference pairs against the SFT model (loss {dpo['loss_type']}, beta "
               f"{dpo['beta']}, label smoothing {dpo['label_smoothing']})")
    else:
        rw = s.get("reward") or {"use_model": True, "function": None}
        reward = " + ".join((["a reward model"] if rw["use_model"] else []) +
                            ([f"the rule {rw['function']}"] if rw["function"] else []))
        how = (f"SFT, then {label} against {reward} with a KL {'loss' if kl.get('use_kl_loss') else 'penalty'} "
               f"(coefficient {kl['coef']}, estimator {kl['estimator']}{', adaptive' if kl['adaptive'] else ''})"
               + (f", {s['rl']['n_samples_per_prompt']} answers per prompt" if s["rl"].get("n_samples_per_prompt", 1) > 1 else ""))
    return (f"This is {what}, trained by rlhf-flow with RLHF: {how}, and a "
            f"pretraining-mixture coefficient of {mix}. LoRA adapters, if any, are merged: load it with "
            f"`AutoModelForCausalLM.from_pretrained(path)`. Prompts follow the `{s['prompt_format']}` format.\n\n"
            f"Made from the step-3 output with content {rl.content_id[:12]} (`rlhf store show` on this export's key "
            "gives the whole lineage).")


# The step-3 metrics an exported actor's card lists as its results (measured over the last tenth of training;
# DPO's are its held-out preference accuracy and margin).
RESULTS = {"reward_last": ("reward", "reward score (step 3, last tenth)"),
           "gold_last": ("reward", "gold reward (step 3, last tenth)"),
           "kl_last": ("kl", "KL to the reference (step 3, last tenth)"),
           "eval_accuracy": ("accuracy", "held-out preference accuracy (DPO)")}


def lineage_meta(ctx: StageContext) -> CardMeta:
    """The exported actors' card metadata: the hub base model and datasets from the SFT output's card (the
    PPO output this export is keyed by names that SFT output's content in its own cards, so they are keyed
    too), and PPO's results."""
    rl = ctx.upstream[RL]
    try:
        sft_card = ctx.store.read_bytes(SFT, rl.upstream[SFT], f"{MODEL}/README.md").decode()
    except FileNotFoundError:  # an SFT output from before cards had metadata
        sft_card = ""
    sft = card_metadata(sft_card)
    return CardMeta(base_model=sft.get("base_model"), datasets=tuple(sft.get("datasets") or ()),
                    tags=("rlhf", rl.config["rl"].get("algorithm", "ppo")), results=RESULTS)


def run_export(ctx: StageContext) -> Manifest:
    settings: ExportSettings = ctx.settings
    rl = ctx.upstream[RL]
    folders = {f.path.split("/")[0] for f in rl.files}
    base = f"SFT output (content {rl.upstream_content[SFT][:12]})"
    metrics: dict = {"models": [], "parameters": 0, "dtype": settings.export.dtype}
    meta = lineage_meta(ctx)

    def write(folder: str) -> None:
        for name, src_folder in EXPORTS.items():
            if src_folder not in folders:
                continue
            src = ctx.fetch(RL, src_folder)
            model = load_causal_lm(src, what=f"the step-3 {name} actor")
            save_causal_lm(model, load_saved_tokenizer(src), os.path.join(folder, name),
                           dtype=torch_dtype(settings.export.dtype),
                           card=model_card(f"{name} actor", base, about(name, rl), rl.metrics, meta))
            metrics["models"].append(name)
            metrics["parameters"] = max(metrics["parameters"], sum(p.numel() for p in model.parameters()))

    return ctx.write_output(write, metrics)
