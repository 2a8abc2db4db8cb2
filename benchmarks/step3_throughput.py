"""Step-3 throughput on one GPU: transformers generate + DeepSpeed (DeepSpeed-Chat's code path when its
hybrid engine is unavailable) against this project's hybrid engine, on the project's own step-3 code (PPO, and
the critic-free GRPO and RLOO: ``--modes fast grpo rloo``).

    python benchmarks/step3_throughput.py                         # batches 32 128 256, both modes
    python benchmarks/step3_throughput.py --modes fast --batches 32 384
    python benchmarks/step3_throughput.py --modes fast grpo rloo --batches 128 256   # PPO against GRPO, RLOO

Workload (as DeepSpeed-Chat's benchmark): random-init OPT-1.3B actor and OPT-350M critic/reward from their
configs, prompt 256 + answer 256 tokens (generation runs the full 256: no EOS), one generation batch and
one PPO epoch per step, actor and critic on DeepSpeed ZeRO-2 in bf16, training micro-batch 16 (or the
batch), no LoRA, no EMA, no gradient checkpointing. The batch counts answers: GRPO and RLOO sample 4 answers to
each of batch / 4 prompts and build no critic (no critic engine, forward or step). Each (mode, batch) runs in
its own process: 1 warm-up step, then the median of ``--steps``. ``--one '{..., "device": "cpu", "tiny": true}'``
runs one (mode, batch) with tiny models on the CPU (the test that keeps this script working).

Reported, per DeepSpeed-Chat's ``perf.py``: generation new tokens/s and its share of the memory-bandwidth
roofline (weights + mean KV-cache bytes per decode step over the measured copy bandwidth); training
TFLOP/s (Megatron formula, actor + critic; the actor alone without a critic) and its share of the measured bf16 matmul peak; effective
step-3 TFLOP/s ((training + generation FLOPs) / end-to-end time); samples/s; peak memory. A greedy check
compares the fast decoder's tokens with transformers generate on the GPU. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPT_1_3B = dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)
OPT_350M = dict(model_type="opt", hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False)
PROMPT, ANSWER = 256, 256
# Tiny shapes for the CPU smoke run (tests/benchmarks/test_step3_throughput.py).
TINY = dict(model_type="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=512,
            max_position_embeddings=128, word_embed_proj_dim=64)
TINY_PROMPT, TINY_ANSWER = 16, 16


def calculate_flops(factor: float, batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """DeepSpeed-Chat's perf.py (Megatron's formula)."""
    return 24 * factor * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


class StubTokenizer:
    """What the PPO code asks of a tokenizer, for token-id-only benchmarks (no hub here)."""

    pad_token_id, bos_token_id, chat_template = 1, 2, None
    eos_token_id = None  # no end token: every answer runs the full length, as in DeepSpeed-Chat's benchmark

    def get_vocab(self):
        return {}


def measure_device() -> dict:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    peak = 2 * n**3 / timed(lambda: a @ b) / 1e12
    bw = 2 * src.numel() * 2 / timed(lambda: dst.copy_(src)) / 1e12  # bytes read + written
    return {"matmul_peak_tflops": peak, "copy_tb_s": bw, "device": torch.cuda.get_device_name()}


# Each mode is the fast path plus config changes; baseline is DeepSpeed-Chat's path and stays as it is.
MODES = {
    "baseline": {"hybrid_engine.enabled": False},
    "fast": {},
    "fast_keep": {"hybrid_engine.release_memory": False},  # weights, cache and graphs kept between rollouts
    "rollout_lp": {"rl.old_logprobs": "rollout"},  # the actor's old log-probs from the sampler, no forward
    "critic_z0": {"rl.critic.deepspeed.zero_stage": 0},  # one GPU: no ZeRO partitioning of the critic
    "opt": {"rl.old_logprobs": "rollout", "rl.critic.deepspeed.zero_stage": 0, "rl.actor.deepspeed.zero_stage": 0},
    "rollout_lp_mb32": {"rl.old_logprobs": "rollout", "rl.train_micro_batch_size": 32},  # half the optimizer steps
    "baseline_mb32": {"hybrid_engine.enabled": False, "rl.train_micro_batch_size": 32},  # its fair comparison
    # generation: weights, cache and graphs kept between rollouts; finer KV buckets (less unused cache read)
    "rollout_lp_keep": {"rl.old_logprobs": "rollout", "hybrid_engine.release_memory": False},
    "rollout_lp_kv32": {"rl.old_logprobs": "rollout", "hybrid_engine.kv_bucket": 32},
    # training on one GPU: without the contiguous-gradient buffer DeepSpeed runs no per-parameter gradient hook at
    # ZeRO-1 (about half the Python calls per micro-step, measured on CPU); ZeRO-2 keeps its partitioning hooks
    "rollout_lp_z1": {"rl.old_logprobs": "rollout", **{f"rl.{m}.deepspeed.{k}": v for m in ("actor", "critic") for k, v in
                      (("zero_stage", 1), ("extra", {"zero_optimization": {"contiguous_gradients": False}}))}},
    "rollout_lp_z2nc": {"rl.old_logprobs": "rollout", **{f"rl.{m}.deepspeed.extra": {"zero_optimization": {
                        "contiguous_gradients": False}} for m in ("actor", "critic")}},
    # DeepSpeed-Chat's single_gpu recipe: the actor trains LoRA adapters (r=128 on every linear layer) only
    "lora": {"rl.actor.lora.enabled": True},
    "lora_rollout_lp": {"rl.actor.lora.enabled": True, "rl.old_logprobs": "rollout"},
    # critic-free: 4 answers per prompt (batch / 4 prompts), KL in the loss as GRPO does; no critic engine
    "grpo": {"rl.algorithm": "grpo", "rl.n_samples_per_prompt": 4, "rl.kl.use_kl_loss": True, "rl.kl.estimator": "k3"},
    "rloo": {"rl.algorithm": "rloo", "rl.n_samples_per_prompt": 4},
}
# everything above that helps, together (and with half the optimizer steps: a different algorithm setting)
MODES["tuned_release"] = {**MODES["rollout_lp_z1"], "hybrid_engine.kv_bucket": 32}  # fits an 80 GB card at 256
MODES["tuned"] = {**MODES["tuned_release"], "hybrid_engine.release_memory": False}
MODES["tuned_mb32"] = {**MODES["tuned"], "rl.train_micro_batch_size": 32}


def run_one(mode: str, batch: int, steps: int, micro: int, device: str = "cuda", tiny: bool = False) -> dict:
    """One (mode, batch): ``steps`` timed steps after a warm-up, on the project's make_experience and update."""
    import torch

    from rlhf_core.config import load_config
    from rlhf_core.engines.training import build_ds_config, init_distributed, initialize
    from rlhf_core.trainers.experience import RewardScorer
    from rlhf_core.engines.hybrid import HybridEngine
    from rlhf_core.models.causal_lm import build_causal_lm
    from rlhf_core.models.reward_model import build_reward_model
    from rlhf_core.config import ModelSpec
    from rlhf_core.config.views import RLSettings
    from rlhf_core.models.reward_model import RewardMeta
    from rlhf_core.trainers.experience import Models, make_experience, sequence_logprobs
    from rlhf_core.trainers.metrics import Timer
    from rlhf_core.models.lora import for_training
    from rlhf_core.trainers.rl import update

    actor_arch, critic_arch = (TINY, TINY) if tiny else (OPT_1_3B, OPT_350M)
    prompt_len, answer_len = (TINY_PROMPT, TINY_ANSWER) if tiny else (PROMPT, ANSWER)
    on_gpu = device == "cuda"
    dist = init_distributed(device)
    tok = StubTokenizer()

    class SizeTok(StubTokenizer):
        def __len__(self):
            return actor_arch["vocab_size"]

    n = MODES[mode].get("rl.n_samples_per_prompt", 1)
    if batch % n:
        raise ValueError(f"mode {mode} samples {n} answers per prompt: the batch ({batch}) must be a multiple of {n}")
    cfg = load_config("single_gpu", {
        "rl.rollout_batch_size": batch // n, "rl.train_micro_batch_size": min(micro, batch),
        "rl.generation.max_answer_len": answer_len, "rl.generation.do_sample": True,
        **({"data.max_prompt_tokens": prompt_len, "rl.actor.deepspeed.precision": "fp32",
            "rl.critic.deepspeed.precision": "fp32"} if not on_gpu else {}),
        "rl.actor.lora.enabled": False, "rl.actor.gradient_checkpointing": False,
        "rl.actor.deepspeed.zero_stage": 2, "rl.critic.deepspeed.zero_stage": 2,
        "rl.actor.optimizer.warmup_steps": 0, "rl.critic.optimizer.warmup_steps": 0,
        "ema.enabled": False, "mixture.ptx_coef": 0.0, "hybrid_engine.enabled": True,
        "hybrid_engine.release_memory": True, **MODES[mode]})
    rl = cfg.rl
    frozen_dtype = torch.bfloat16 if on_gpu else torch.float32
    t_setup = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the host
        actor = for_training(build_causal_lm(ModelSpec(architecture=actor_arch, tokenizer="stub"), SizeTok(), dropout=0.0),
                             rl.actor.lora, False)
        critic = None
        if rl.uses_critic:  # GRPO, RLOO: no critic at all
            critic = build_reward_model(ModelSpec(architecture=critic_arch, tokenizer="stub", init_seed=1), SizeTok(),
                                        dropout=0.0)
        ref = build_causal_lm(ModelSpec(architecture=actor_arch, tokenizer="stub"), SizeTok(), dtype=frozen_dtype).eval()
        reward = build_reward_model(ModelSpec(architecture=critic_arch, tokenizer="stub", init_seed=1), SizeTok(),
                                    dtype=frozen_dtype).eval()
    print(f"models built in {time.perf_counter() - t_setup:.1f}s", file=sys.stderr, flush=True)
    updates = (steps + 1) * -(-batch // rl.train_micro_batch_size)
    micro = rl.train_micro_batch_size
    actor_e = initialize(actor, build_ds_config(rl.actor.deepspeed, rl.actor.optimizer, micro, 1, 1),
                         rl.actor.optimizer, updates)
    critic_e = None
    if critic is not None:
        critic_e = initialize(critic, build_ds_config(rl.critic.deepspeed, rl.critic.optimizer, micro, 1, 1),
                              rl.critic.optimizer, updates)
    print(f"engines ready at {time.perf_counter() - t_setup:.1f}s", file=sys.stderr, flush=True)
    m = Models(actor_e, critic_e, ref.requires_grad_(False), reward.requires_grad_(False), None, tok, tok,
               RewardMeta(score_mean=0.0, score_std=1.0, max_seq_len=prompt_len + answer_len + 1,
                          prompt_format="human_assistant", eval_accuracy=0.5))
    hybrid = HybridEngine(actor_e, tok, rl.generation, cfg.hybrid_engine)
    scorer = RewardScorer(reward, tok, tok, "human_assistant", prompt_len + answer_len + 1, dist.device)
    # batch / n prompts, each n times in a row (a group), as the trainer repeats them
    ids = torch.randint(3, actor_arch["vocab_size"], (batch // n, prompt_len), device=dist.device).repeat_interleave(n, 0)
    mask = torch.ones_like(ids)
    prompts = [""] * batch

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    rows, lp_gap = [], {}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):
        timer = Timer(dist.device)
        t0 = time.perf_counter()
        with timer("generate"):
            rollout = hybrid.generate(ids, mask, timer=timer)
        exp, _ = make_experience(m, scorer, rollout, prompts, cfg.rl, 0.1, timer)
        sync()
        t1 = time.perf_counter()
        if step == steps and rollout.logprobs is not None:  # the sampler's log-probs against a forward of the
            with torch.no_grad():  # same weights (before this step's update), untimed
                forward = sequence_logprobs(actor_e, rollout.sequences, rollout.attention_mask, rollout.prompt_len,
                                            rl.generation.logprob_temperature, rl.train_micro_batch_size)
            gap = (rollout.logprobs - forward).abs()[rollout.response_mask.bool()]
            lp_gap = {"logprob_gap_mean": float(gap.mean()), "logprob_gap_max": float(gap.max())}
        t_gap = time.perf_counter() - t1
        update(m, exp, RLSettings.from_config(cfg), step, None, timer)
        sync()
        t2 = time.perf_counter()
        assert int(rollout.response_mask.sum()) == batch * answer_len
        if step:  # the first step warms up (graph capture, allocator, cuBLAS heuristics)
            rows.append({"gen_exp": t1 - t0, "train": t2 - t1 - t_gap, "e2e": t2 - t0 - t_gap, **timer.times})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"mode": mode, "batch": batch, "micro": rl.train_micro_batch_size, "generation_path": hybrid.path,
            "algorithm": rl.algorithm, "critic": critic_e is not None, "samples_per_prompt": n,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0, **lp_gap, **med}


def greedy_check() -> dict:
    """Fast decoder vs transformers generate, greedy, on the GPU: fp32 weights (TF32 off) must agree token
    for token; bf16 agreement is reported (different kernels round differently, so near-ties may flip)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_core.engines.decode import FastDecoder, arch_of

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for name, arch in (("opt-1.3b-shape", OPT_1_3B), ("opt-350m-shape", OPT_350M)):
        kw = dict(arch)
        config = AutoConfig.for_model(kw.pop("model_type"), **kw, pad_token_id=1, eos_token_id=2, bos_token_id=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).cuda().eval()
        with torch.no_grad():  # random init is nearly flat; sharpen it so greedy choices are not coin flips
            model.lm_head.weight.mul_(20.0)
        ids = torch.randint(3, 50272, (8, 64), device="cuda")
        mask = torch.ones_like(ids)
        mask[::2, :10] = 0  # left padding on half the rows
        for dtype in (torch.float32, torch.bfloat16):
            ref_model = model.to(dtype)
            ref = ref_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                     pad_token_id=1, eos_token_id=None)[:, 64:]
            fd = FastDecoder(arch_of(model.config), torch.device("cuda"), dtype, 1, None, do_sample=False)
            fd.load(ref_model)
            got = fd.generate(ids, mask, 64)
            out[f"{name} {str(dtype).removeprefix('torch.')}"] = {
                "rows_equal": int((got == ref).all(1).sum()), "rows": got.shape[0],
                "tokens_equal": float((got == ref).float().mean())}
    return out


def roofline_tokens_s(batch: int, copy_tb_s: float) -> float:
    """New tokens/s if a decode step only streamed the bf16 weights and the mean KV cache once."""
    weights = 1.3158e9 * 2
    mean_ctx = PROMPT + ANSWER / 2
    kv = 2 * OPT_1_3B["num_hidden_layers"] * batch * mean_ctx * OPT_1_3B["hidden_size"] * 2
    return batch / ((weights + kv) / (copy_tb_s * 1e12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["baseline", "fast"], choices=sorted(MODES),
                    help="the fast path plus config changes (MODES); baseline: transformers generate + DeepSpeed")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--runs", nargs="+", metavar="MODE:BATCH",
                    help="explicit (mode, batch) pairs, run in this order, instead of --modes x --batches")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--report", metavar="DIR", help="print the tables from DIR's step3_device.json and "
                    "step3_rows.jsonl (rows of a run cut short) and exit")
    args = ap.parse_args()
    if args.one:
        print("@@result " + json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    if args.report:
        with open(os.path.join(args.report, "step3_device.json")) as f:
            dev = json.load(f)
        with open(os.path.join(args.report, "step3_rows.jsonl")) as f:
            report(dev, [json.loads(line) for line in f if line.strip()], {}, args.out)
        return

    pairs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs else
             [(mode, batch) for mode in args.modes for batch in args.batches])
    unknown = sorted({mode for mode, _ in pairs} - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; modes are {sorted(MODES)}")
    dev = measure_device()
    with open(os.path.join(args.out, "step3_device.json"), "w") as f:  # kept even if the run is cut short
        json.dump(dev, f)
    open(os.path.join(args.out, "step3_rows.jsonl"), "w").close()  # this run's rows only, beside its device
    rows = []
    for mode, batch in pairs:  # one process each; each row is also appended to step3_rows.jsonl as it comes
        one = {"mode": mode, "batch": batch, "steps": args.steps, "micro": args.micro}
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True)
        found = [l for l in proc.stdout.splitlines() if l.startswith("@@result ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout)[-600:]
            rows.append({**one, "error": "OOM" if "out of memory" in tail.lower() else tail})
        else:
            rows.append(json.loads(found[-1][len("@@result "):]))
        r = rows[-1]
        print(f"{mode} {batch}: {time.time() - t0:.0f}s " + (f"step {r['e2e']:.2f}s = generate {r['generate']:.2f} + score "
              f"{r.get('score', 0):.2f} + train {r['train']:.2f}" if "e2e" in r else r["error"][-300:]), flush=True)
        with open(os.path.join(args.out, "step3_rows.jsonl"), "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    check = {} if args.no_check else greedy_check()
    report(dev, rows, check, args.out)


def report(dev: dict, rows: list[dict], check: dict, out: str) -> None:
    """Derived rates for each row, the raw JSON under ``out`` and the tables on stdout."""
    L, h, V = OPT_1_3B["num_hidden_layers"], OPT_1_3B["hidden_size"], OPT_1_3B["vocab_size"]
    cL, ch = OPT_350M["num_hidden_layers"], OPT_350M["hidden_size"]
    seq = PROMPT + ANSWER
    for r in rows:
        if "error" in r:
            continue
        b = r["batch"]
        train_flops = calculate_flops(3, b, seq, L, h, V) + (calculate_flops(3, b, seq, cL, ch, V) if r["critic"] else 0)
        gen_flops = calculate_flops(1, b, seq, L, h, V)
        r.update(gen_tokens_s=b * ANSWER / r["generate"], roofline_tokens_s=roofline_tokens_s(b, dev["copy_tb_s"]),
                 train_tflops=train_flops / r["train"] / 1e12, effective_tflops=(train_flops + gen_flops) / r["e2e"] / 1e12,
                 samples_s=b / r["e2e"])
        r["roofline_share"] = r["gen_tokens_s"] / r["roofline_tokens_s"]
        r["peak_share"] = r["train_tflops"] / dev["matmul_peak_tflops"]
    with open(os.path.join(out, "step3_throughput.json"), "w") as f:
        json.dump({**dev, "rows": rows, "greedy_check": check}, f, indent=2)

    print(f"\nStep 3, OPT-1.3B actor + OPT-350M critic/reward, prompt {PROMPT} + answer {ANSWER}, {dev['device']}; "
          f"measured bf16 matmul {dev['matmul_peak_tflops']:.0f} TFLOP/s, copy {dev['copy_tb_s']:.2f} TB/s")
    print("| mode | batch | gen tok/s | % roofline | train TFLOP/s | % peak | effective TFLOP/s | samples/s | "
          "generate s | score s | train s | peak GiB |")
    print("|---" * 12 + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['batch']} | {r['error'][:60]!r} |")
            continue
        print(f"| {r['mode']} | {r['batch']} | {r['gen_tokens_s']:.0f} | {r['roofline_share']:.0%} | "
              f"{r['train_tflops']:.0f} | {r['peak_share']:.0%} | {r['effective_tflops']:.0f} | {r['samples_s']:.1f} | "
              f"{r['generate']:.2f} | {r.get('score', 0):.2f} | {r['train']:.2f} | {r['peak_gib']:.1f} |")
    print("\nPer phase, s per step (generate: the fast path's load / graph capture / prefill / decode / release):")
    print("| mode | batch | load | capture | prefill | decode | release | actor f+b | actor step | critic f+b | critic step |")
    print("|---" * 11 + "|")
    for r in rows:
        if "error" not in r:
            cols = ["generate/load", "generate/capture", "generate/prefill", "generate/decode", "generate/release",
                    "train/actor_forward_backward", "train/actor_step", "train/critic_forward_backward",
                    "train/critic_step"]
            print(f"| {r['mode']} | {r['batch']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |")
    for r in rows:
        if "logprob_gap_mean" in r:
            print(f"{r['mode']} {r['batch']}: sampler log-probs vs an actor forward, |diff| mean "
                  f"{r['logprob_gap_mean']:.4f}, max {r['logprob_gap_max']:.3f} (bf16)")
    for k, v in check.items():
        print(f"greedy vs transformers, {k}: {v['rows_equal']}/{v['rows']} rows identical, {v['tokens_equal']:.1%} tokens")


if __name__ == "__main__":
    main()
