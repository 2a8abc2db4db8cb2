"""SFT training throughput of an OPT-1.3B-shaped actor (random init from config) on one GPU.

    python benchmarks/sft_throughput.py                       # ZeRO-2 and ZeRO-3, micro 8 and 16, seq 512
    python benchmarks/sft_throughput.py --zero 2 --micro 8 --grad-ckpt

Each configuration runs in its own process (a clean allocator and DeepSpeed state), through the same
``rlhf_core.engines.training.initialize`` and loss as the SFT stage, on random token batches. FLOPs per step follow
DeepSpeed-Chat's ``perf.py`` (``calculate_flops``: 24 * ckpt_factor * B * s * L * h^2 * (1 + s/(6h) +
V/(16 L h)), ckpt_factor 3, or 4 with gradient checkpointing), so numbers compare with theirs. The bf16
matmul peak is measured in the same run; MFU = achieved / measured peak. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OPT_1_3B = dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0)


def dschat_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int, grad_ckpt: bool) -> float:
    factor = 4 if grad_ckpt else 3
    return 24 * factor * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def matmul_peak_tflops() -> float:
    import torch

    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def run_one(zero: int, micro: int, seq: int, steps: int, warmup: int, grad_ckpt: bool) -> dict:
    import torch

    from rlhf_core.config import DeepSpeedConfig, ModelSpec, OptimizerConfig
    from rlhf_core.engines.training import build_ds_config, init_distributed, initialize
    from rlhf_core.models.causal_lm import build_causal_lm
    from rlhf_core.models.lora import enable_gradient_checkpointing
    from rlhf_core.trainers.sft import token_loss_sum

    dist = init_distributed("cuda")

    class Tok:  # what build_config needs of a tokenizer; no hub on the benchmark machine
        pad_token_id, eos_token_id, bos_token_id = 1, 2, 2

        def __len__(self):
            return OPT_1_3B["vocab_size"]

    model = build_causal_lm(ModelSpec(architecture=OPT_1_3B, tokenizer="none"), Tok())
    if grad_ckpt:
        enable_gradient_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    opt = OptimizerConfig(lr=1e-5)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=zero, precision="bf16"), opt, micro, 1, dist.world_size)
    engine = initialize(model, ds, opt, total_steps=steps + warmup)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, OPT_1_3B["vocab_size"], (micro, seq), device=dist.device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = engine(input_ids=ids, attention_mask=mask).logits
        s, n = token_loss_sum(logits, ids)
        engine.backward(s / n)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = dschat_flops(micro, seq, OPT_1_3B["num_hidden_layers"], OPT_1_3B["hidden_size"], OPT_1_3B["vocab_size"],
                         grad_ckpt)
    return {"zero": zero, "micro": micro, "seq": seq, "grad_ckpt": grad_ckpt, "params_b": n_params / 1e9,
            "step_s": step_s, "step_spread": (max(times) - min(times)) / step_s, "tokens_s": micro * seq / step_s,
            "tflops": flops / step_s / 1e12, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--micro", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = ap.parse_args()
    if args.one:
        print("@@result " + json.dumps(run_one(**json.loads(args.one))), flush=True)
        return

    import torch

    peak = matmul_peak_tflops()
    rows = []
    for zero in args.zero:
        for micro in args.micro:
            one = {"zero": zero, "micro": micro, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                   "grad_ckpt": args.grad_ckpt}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("@@result ")]
            if proc.returncode or not lines:
                rows.append({**one, "error": (proc.stderr or proc.stdout)[-400:]})
                continue
            rows.append(json.loads(lines[-1][len("@@result "):]))
    device = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "sft_throughput.json"), "w") as f:
        json.dump({"device": device, "matmul_peak_tflops": peak, "rows": rows}, f, indent=2)
    print(f"\nSFT throughput, OPT-1.3B-shaped, bf16, {device}; measured bf16 matmul peak {peak:.0f} TFLOP/s")
    print("| ZeRO | micro x seq | grad ckpt | step s | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['zero']} | {r['micro']} x {r['seq']} | {r['grad_ckpt']} | error: {r['error'][-120:]!r} |")
            continue
        print(f"| {r['zero']} | {r['micro']} x {r['seq']} | {r['grad_ckpt']} | {r['step_s']:.3f} | {r['tokens_s']:.0f} | "
              f"{r['tflops']:.1f} | {r['tflops'] / peak:.0%} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
