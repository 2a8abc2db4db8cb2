"""The host (Python) side of a DeepSpeed training micro-step: forward + backward + optimizer step of a model
with the parameter layout of OPT-350M (24 layers, 389 tensors) but tiny widths, on the CPU, so that what is
counted is DeepSpeed's per-parameter bookkeeping, not arithmetic.

    python benchmarks/ds_host_overhead.py          # prints a table; about a minute on 2 cores

On a GPU this work is what the device waits for when kernels are short (the 350M critic at micro-batch 16 took
79 ms per micro-step at ZeRO-2 against 43 ms at ZeRO-0 on an H100: results/train_step_profile_h100.txt).
Python function calls are counted with cProfile: deterministic, so the table does not depend on the machine's
load; the profiled time (inflated by the profiler, and by the load) is shown beside it.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUT = dict(model_type="opt", hidden_size=32, num_hidden_layers=24, ffn_dim=64, num_attention_heads=2,
              vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False)
NO_CONTIGUOUS = {"zero_optimization": {"contiguous_gradients": False}}
CONFIGS = [(0, {}), (1, {}), (2, {}), (1, NO_CONTIGUOUS), (2, NO_CONTIGUOUS)]


def measure(zero: int, extra: dict, iters: int = 5) -> dict:
    import torch

    from benchmarks.step3_throughput import StubTokenizer
    from rlhf_core.config import DeepSpeedConfig, ModelSpec, OptimizerConfig
    from rlhf_core.engines.training import build_ds_config, init_distributed, initialize
    from rlhf_core.models.reward_model import build_reward_model

    class SizeTok(StubTokenizer):
        def __len__(self):
            return LAYOUT["vocab_size"]

    init_distributed("cpu", cpu_threads=1)
    model = build_reward_model(ModelSpec(architecture=LAYOUT, tokenizer="stub"), SizeTok(), dropout=0.0)
    opt = OptimizerConfig(lr=1e-6)
    ds = DeepSpeedConfig(zero_stage=zero, precision="bf16", gradient_clipping=1.0, extra=extra)
    engine = initialize(model, build_ds_config(ds, opt, 2, 1, 1), opt, 100)
    ids = torch.randint(3, LAYOUT["vocab_size"] - 1, (2, 8))
    mask = torch.ones_like(ids)

    def micro_step():
        engine.backward(engine(ids, mask).float().mean())
        engine.step()

    for _ in range(3):  # warm-up: buffers, first-step allocations
        micro_step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        micro_step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    calls = sum(v[1] for v in stats.values()) / iters
    ds_calls = sum(v[1] for k, v in stats.items() if f"{os.sep}deepspeed{os.sep}" in k[0]) / iters
    total = sum(v[2] for v in stats.values()) / iters
    return {"zero": zero, "extra": extra, "params": len(list(model.parameters())), "calls": calls,
            "deepspeed_calls": ds_calls, "profiled_ms": total * 1e3}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print("@@result " + json.dumps(measure(**json.loads(sys.argv[2]))), flush=True)
        return
    rows = []
    for zero, extra in CONFIGS:  # a process each: DeepSpeed keeps global state
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps({"zero": zero, "extra": extra})],
                              capture_output=True, text=True, cwd=ROOT)
        found = [line for line in proc.stdout.splitlines() if line.startswith("@@result ")]
        if proc.returncode or not found:
            sys.exit(f"zero {zero} {extra}: failed\n{proc.stderr[-2000:]}")
        rows.append(json.loads(found[-1][len("@@result "):]))
    print(f"\nDeepSpeed host work per micro-step (forward, backward, optimizer step), {rows[0]['params']} parameter "
          "tensors, bf16, one process")
    print("| ZeRO | contiguous_gradients | Python calls | of which in DeepSpeed | profiled ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        contiguous = r["extra"].get("zero_optimization", {}).get("contiguous_gradients", True)
        print(f"| {r['zero']} | {str(contiguous).lower()} | {r['calls']:.0f} | {r['deepspeed_calls']:.0f} | "
              f"{r['profiled_ms']:.1f} |")


if __name__ == "__main__":
    main()
