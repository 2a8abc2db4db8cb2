"""Does step 3 fit one GPU for a large actor? LoRA + ZeRO-3 + offload, as DeepSpeed-Chat runs OPT-13B on
one 80 GB A100.

    python benchmarks/step3_memory.py --actor 13b --batch 8

Random-init OPT-shaped actor (1.3b / 6.7b / 13b / 30b) with LoRA r=128 on every linear layer (only LoRA
trained), ZeRO-3 with parameters and optimizer state offloaded to host memory, gradient checkpointing; the
frozen reference offloaded to host memory between uses; OPT-350M critic and reward model; prompt 256 +
answer 256; the hybrid engine's fast path (weights gathered once per rollout, released before training).
Runs one warm-up and one measured PPO step and prints peak GPU memory and time per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step3_throughput import ANSWER, OPT_350M, PROMPT, StubTokenizer  # noqa: E402

ACTORS = {
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
    "30b": dict(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672, num_attention_heads=56),
}


class SizeTok(StubTokenizer):
    def __len__(self):
        return 50272


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actor", choices=sorted(ACTORS), default="13b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    from rlhf_core.config import ModelSpec, load_config
    from rlhf_core.engine import init_distributed, initialize
    from rlhf_core.experience import RewardScorer
    from rlhf_core.hybrid_engine import HybridEngine
    from rlhf_core.models import apply_lora, build_causal_lm, build_reward_model, enable_gradient_checkpointing
    from rlhf_core.trainers.ppo import Models, Timer, make_experience, update

    arch = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, **ACTORS[args.actor])
    arch["word_embed_proj_dim"] = arch["hidden_size"]
    linear = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    cfg = load_config("single_gpu", {
        "ppo.rollout_batch_size": args.batch, "ppo.train_micro_batch_size": args.batch,
        "ppo.generation.max_answer_len": ANSWER,
        "ppo.actor.deepspeed": {"zero_stage": 3, "offload_params": True, "offload_optimizer": True, "precision": "bf16"},
        "ppo.actor.lora": {"enabled": True, "r": 128, "alpha": 128, "target_modules": linear, "only_optimize_lora": True},
        "ppo.actor.gradient_checkpointing": True, "ppo.offload_reference": True,
        "ppo.critic.deepspeed": {"zero_stage": 2, "precision": "bf16"},
        "ema.enabled": False, "mixture.ptx_coef": 0.0, "hybrid_engine.enabled": True, "hybrid_engine.release_memory": True})
    ppo = cfg.ppo
    dist = init_distributed("cuda")
    t0 = time.perf_counter()
    with torch.device("cuda"):
        actor = build_causal_lm(ModelSpec(architecture=arch, tokenizer="stub"), SizeTok(), dtype=torch.bfloat16, dropout=0.0)
    actor = apply_lora(actor, ppo.actor.lora)
    enable_gradient_checkpointing(actor)
    actor_e = initialize(actor, ppo.actor.deepspeed, ppo.actor.optimizer, args.batch, 1, 1, 10)
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        ref = build_causal_lm(ModelSpec(architecture=arch, tokenizer="stub"), SizeTok(), dtype=torch.bfloat16).eval()
    ref = ref.requires_grad_(False).to("cpu")
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        critic = build_reward_model(ModelSpec(architecture=OPT_350M, tokenizer="stub"), SizeTok(), dropout=0.0)
        reward = build_reward_model(ModelSpec(architecture=OPT_350M, tokenizer="stub"), SizeTok(),
                                    dtype=torch.bfloat16).eval().requires_grad_(False)
    critic_e = initialize(critic, ppo.critic.deepspeed, ppo.critic.optimizer, args.batch, 1, 1, 10)
    setup_s = time.perf_counter() - t0
    tok = StubTokenizer()
    m = Models(actor_e, critic_e, ref, reward, None, tok, tok)
    hybrid = HybridEngine(actor_e, tok, ppo.generation, cfg.hybrid_engine)
    scorer = RewardScorer(reward, tok, tok, "human_assistant", PROMPT + ANSWER + 1, dist.device)
    ids = torch.randint(3, 50272, (args.batch, PROMPT), device=dist.device)
    mask = torch.ones_like(ids)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in actor_e.module.parameters())
    result = {}
    for step in range(2):
        torch.cuda.reset_peak_memory_stats()
        timer = Timer(dist.device)
        t = time.perf_counter()
        with timer("generate"):
            rollout = hybrid.generate(ids, mask)
        gen_peak = torch.cuda.max_memory_allocated()
        exp, _ = make_experience(m, scorer, rollout, [""] * args.batch, cfg, 0.1, (0.0, 1.0), timer)
        update(m, exp, cfg, step, None, timer)
        torch.cuda.synchronize()
        result = {"actor": args.actor, "actor_params_b": n_params / 1e9, "batch": args.batch,
                  "generation_path": hybrid.path, "setup_s": setup_s, "step_s": time.perf_counter() - t,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "generate_peak_gib": gen_peak / 2**30,
                  **{k: round(v, 2) for k, v in timer.times.items()}}
        print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, f"step3_memory_{args.actor}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), **result}, f, indent=2)
    print(f"\n{args.actor} actor ({result['actor_params_b']:.1f}B params), batch {args.batch}: step 3 fits; "
          f"peak {result['peak_gib']:.1f} GiB (generation {result['generate_peak_gib']:.1f}), step {result['step_s']:.1f}s")


if __name__ == "__main__":
    main()
