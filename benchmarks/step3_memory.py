"""Does step 3 fit one GPU for a large actor? Two layouts of a LoRA actor:

    python benchmarks/step3_memory.py --actor 30b --batch 8 --layout auto      # placement by memory
    python benchmarks/step3_memory.py --actor 13b --batch 8 --layout offload   # DeepSpeed-Chat's OPT-13B recipe
    python benchmarks/step3_memory.py --actor tiny --batch 2 --device cpu --out /tmp   # smoke check, no GPU

Random-init OPT-shaped actor (1.3b / 6.7b / 13b / 30b / 66b) with LoRA r=128 on every linear layer (only
LoRA trained), gradient checkpointing; OPT-350M critic and reward model; prompt 256 + answer 256; the
hybrid engine (its fast path when the weights and cache fit beside training, else transformers generate).

- ``offload``: ZeRO-3 with parameters and optimizer state in host memory, the frozen reference a ZeRO-3
  engine with its partitions in host memory (as DeepSpeed-Chat runs OPT-13B on one 80 GB A100);
- ``auto``: what ``rl.placement: auto`` does: nothing offloaded that fits the device; the actor's frozen
  base on the GPU (ZeRO-0), the reference is the actor with its adapters off (no second copy), the reward
  model where the measured free memory allows.

Runs one warm-up and one measured step 3 and prints peak GPU and host memory and time per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step3_throughput import ANSWER, OPT_350M, PROMPT, StubTokenizer  # noqa: E402

ACTORS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4),  # CPU smoke check
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
    "30b": dict(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672, num_attention_heads=56),
    "66b": dict(hidden_size=9216, num_hidden_layers=64, ffn_dim=36864, num_attention_heads=72),
}
TINY_CRITIC = dict(OPT_350M, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                   word_embed_proj_dim=64)


class SizeTok(StubTokenizer):
    def __len__(self):
        return 50272


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actor", choices=sorted(ACTORS), default="13b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke check (use --actor tiny)")
    ap.add_argument("--layout", choices=["auto", "offload"], default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    from rlhf_core.config import ModelSpec, load_config
    from rlhf_core.engines.training import build_ds_config, init_distributed, initialize
    from rlhf_core.trainers.experience import RewardScorer
    from rlhf_core.engines.hybrid import HybridEngine
    from rlhf_core.models.causal_lm import build_causal_lm
    from rlhf_core.models.lora import for_training
    from rlhf_core.models.reward_model import build_reward_model
    from rlhf_core.config.views import RLSettings
    from rlhf_core.models.reward_model import RewardMeta
    from rlhf_core.trainers.experience import (AdaptersOff, Models, frozen_model, generation_reserve, make_experience,
                                               param_bytes, placement)
    from rlhf_core.trainers.metrics import Timer
    from rlhf_core.trainers.rl import update

    tiny = args.actor == "tiny"
    prompt, answer = (16, 16) if tiny else (PROMPT, ANSWER)
    critic_arch = TINY_CRITIC if tiny else OPT_350M
    arch = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, **ACTORS[args.actor])
    arch["word_embed_proj_dim"] = arch["hidden_size"]
    linear = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    precision = "bf16" if args.device == "cuda" else "fp32"
    offload = args.layout == "offload"
    actor_ds = ({"zero_stage": 3, "offload_params": True, "offload_optimizer": True, "precision": precision} if offload
                else {"zero_stage": 0, "precision": precision})
    cfg = load_config("single_gpu", {
        "resources.device": args.device,
        "rl.rollout_batch_size": args.batch, "rl.train_micro_batch_size": args.batch,
        "rl.generation.max_answer_len": answer, "rl.placement": "manual" if offload else "auto",
        "rl.actor.deepspeed": actor_ds,
        "rl.actor.lora": {"enabled": True, "r": 128, "alpha": 128, "target_modules": linear, "only_optimize_lora": True},
        "rl.actor.gradient_checkpointing": True, "rl.offload_reference": offload,
        "rl.critic.deepspeed": {"zero_stage": 0 if not offload else 2, "precision": precision},
        "ema.enabled": False, "mixture.ptx_coef": 0.0, "hybrid_engine.enabled": True, "hybrid_engine.release_memory": True})
    rl = cfg.rl
    dist = init_distributed(args.device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    # Random init is built whole (on the GPU: seconds, not minutes), then ZeRO-3 partitions and offloads it.
    with torch.device(dist.device):
        actor = build_causal_lm(ModelSpec(architecture=arch, tokenizer="stub"), SizeTok(), dtype=dtype, dropout=0.0)
    actor = for_training(actor, rl.actor.lora, rl.actor.gradient_checkpointing)
    actor_e = initialize(actor, build_ds_config(rl.actor.deepspeed, rl.actor.optimizer, args.batch, 1, 1),
                         rl.actor.optimizer, 10)
    del actor
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()

    def load_ref(dtype, _ds):
        with torch.device(dist.device):
            return build_causal_lm(ModelSpec(architecture=arch, tokenizer="stub"), SizeTok(), dtype=dtype)

    with torch.device(dist.device):
        critic = build_reward_model(ModelSpec(architecture=critic_arch, tokenizer="stub"), SizeTok(), dropout=0.0)
    critic_e = initialize(critic, build_ds_config(rl.critic.deepspeed, rl.critic.optimizer, args.batch, 1, 1),
                          rl.critic.optimizer, 10)
    if offload:  # as DeepSpeed-Chat sets it up: beside a ZeRO-3 actor the reference is a ZeRO-3 engine, offloaded
        ref, ref_offloaded = frozen_model(load_ref, rl.actor.deepspeed, rl.offload_reference, args.batch, dist)
        reward_on_host = False
    else:  # as build_models does under rl.placement: auto with a LoRA actor
        ref, ref_offloaded = AdaptersOff(actor_e), False
        reward_on_host = placement(rl, dist.device, {"reference": 0, "reward": param_bytes(critic_e.module, rl.critic)},
                                   reserve=generation_reserve(actor_e.module, rl))["reward"]
    with torch.device(dist.device):
        reward = build_reward_model(ModelSpec(architecture=critic_arch, tokenizer="stub"), SizeTok(),
                                    dtype=dtype).eval().requires_grad_(False)
    if reward_on_host:
        reward.to("cpu")
    setup_s = time.perf_counter() - t0
    tok = StubTokenizer()
    meta = RewardMeta(score_mean=0.0, score_std=1.0, max_seq_len=PROMPT + ANSWER + 1, prompt_format="human_assistant",
                      eval_accuracy=0.5)
    m = Models(actor_e, critic_e, ref, reward, None, tok, tok, meta, ref_offloaded, reward_on_host)
    hybrid = HybridEngine(actor_e, tok, rl.generation, cfg.hybrid_engine)
    scorer = RewardScorer(reward, tok, tok, "human_assistant", prompt + answer + 1, dist.device)
    ids = torch.randint(3, 50272, (args.batch, prompt), device=dist.device)
    mask = torch.ones_like(ids)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in actor_e.module.parameters())
    result = {}
    for step in range(2):
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timer = Timer(dist.device)
        t = time.perf_counter()
        with timer("generate"):
            rollout = hybrid.generate(ids, mask)
        gen_peak = _peak_gib(dist.device)
        exp, _ = make_experience(m, scorer, rollout, [""] * args.batch, cfg.rl, 0.1, timer)
        update(m, exp, RLSettings.from_config(cfg), step, None, timer)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        result = {"actor": args.actor, "layout": args.layout, "actor_params_b": n_params / 1e9, "batch": args.batch,
                  "generation_path": hybrid.path, "setup_s": setup_s, "step_s": time.perf_counter() - t,
                  "peak_gib": _peak_gib(dist.device), "generate_peak_gib": gen_peak,
                  "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  **{k: round(v, 2) for k, v in timer.times.items()}}
        print(json.dumps(result), flush=True)
    device = torch.cuda.get_device_name() if dist.device.type == "cuda" else "cpu"
    with open(os.path.join(args.out, f"step3_memory_{args.actor}_{args.layout}.json"), "w") as f:
        json.dump({"device": device, **result}, f, indent=2)
    memory = (f"peak {result['peak_gib']:.1f} GiB (generation {result['generate_peak_gib']:.1f})"
              if dist.device.type == "cuda" else "no GPU memory to measure")
    print(f"\n{args.actor} actor ({result['actor_params_b']:.2f}B params, layout {args.layout}), batch {args.batch} on "
          f"{device}: step 3 ran; {memory}, host peak {result['host_peak_gib']:.1f} GiB, step {result['step_s']:.1f}s, "
          f"generation path {result['generation_path']}")


if __name__ == "__main__":
    main()
