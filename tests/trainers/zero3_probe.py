"""Run under torchrun by tests/trainers/test_zero3.py: saved models loaded for a ZeRO-3 engine are partitioned
as they load (no rank holds a whole copy), and frozen ZeRO-3 engines give the same outputs as whole models.

Usage: torchrun --nproc_per_node N tests/trainers/zero3_probe.py FOLDER OUT.json [--no-partition]
(``--no-partition`` is the negative control: the same loads without a DeepSpeed config.)
"""

import json
import os
import sys

import torch

from rlhf_core.config import DeepSpeedConfig, OptimizerConfig, load_config
from rlhf_core.engines.training import barrier, build_ds_config, frozen_config, frozen_engine, init_distributed
from rlhf_core.models.causal_lm import build_causal_lm, load_causal_lm, save_causal_lm
from rlhf_core.models.reward_model import RewardMeta, build_reward_model, load_reward_model, save_reward_model
from rlhf_core.models.tokenizers import load_tokenizer


def local_fraction(model: torch.nn.Module) -> float:
    """Elements this rank holds over the model's total: about 1/world when partitioned, 1 when whole."""
    held = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return held / total


def main(folder: str, out: str, partition: bool) -> None:
    dist = init_distributed("cpu")
    cfg = load_config("tiny")
    tok = load_tokenizer(cfg.models.actor)
    actor_dir, reward_dir = os.path.join(folder, "actor"), os.path.join(folder, "reward")
    if dist.rank == 0:
        save_causal_lm(build_causal_lm(cfg.models.actor, tok), tok, actor_dir)
        rtok = load_tokenizer(cfg.models.reward, "reward")
        meta = RewardMeta(score_mean=0.5, score_std=2.0, max_seq_len=48, prompt_format="human_assistant", eval_accuracy=0.5)
        save_reward_model(build_reward_model(cfg.models.reward, rtok), rtok, reward_dir, meta)
    barrier()

    ids = torch.randint(3, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    whole_actor, whole_reward = load_causal_lm(actor_dir).eval(), load_reward_model(reward_dir).eval()
    with torch.no_grad():
        want_logits = whole_actor(input_ids=ids, attention_mask=mask).logits
        want_scores = whole_reward.score(ids, mask)

    ds = frozen_config("fp32", offload=False, micro_batch=4, world_size=dist.world_size) if partition else None
    train_ds = build_ds_config(DeepSpeedConfig(zero_stage=3), OptimizerConfig(), 4, 1, dist.world_size) if partition else None
    actor = load_causal_lm(actor_dir, partition_with=ds)
    reward = load_reward_model(reward_dir, partition_with=ds)
    trainee = load_causal_lm(actor_dir, partition_with=train_ds)
    report = {"rank": dist.rank, "world": dist.world_size,
              "actor_fraction": local_fraction(actor), "reward_backbone_fraction": local_fraction(reward.backbone),
              "trainee_fraction": local_fraction(trainee)}
    if partition:
        actor, reward = frozen_engine(actor, ds), frozen_engine(reward, ds)
        report["reward_fraction_after_engine"] = local_fraction(reward)  # the head joins the partitions
    with torch.no_grad():
        logits = actor(input_ids=ids, attention_mask=mask).logits
        scores = reward.score(ids, mask)
    report["max_logit_diff"] = (logits - want_logits).abs().max().item()
    report["max_score_diff"] = (scores - want_scores).abs().max().item()
    report["score_stats"] = [reward.score_mean.item(), reward.score_std.item()]
    reports = [None] * dist.world_size
    torch.distributed.all_gather_object(reports, report)
    if dist.rank == 0:
        with open(out, "w") as f:
            json.dump(reports, f)
    barrier()
    # Leave the group before the interpreter's teardown: without it gloo's threads can meet a destructor
    # first and abort the process ("terminate called without an active exception", seen once on a loaded
    # machine) after the report was written. Stage workers skip teardown (os._exit in stages/launch.py).
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--no-partition" not in sys.argv)
