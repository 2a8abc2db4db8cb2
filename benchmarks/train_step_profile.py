"""Where a PPO training micro-step's time goes: forward+backward and optimizer step of the actor
(OPT-1.3B shape) and critic (OPT-350M shape) on DeepSpeed, micro-batch 16 x 512, bf16, one GPU.

    python benchmarks/train_step_profile.py

Times each configuration (ZeRO stage, gradient clipping) with device synchronisation around backward and
step, then prints torch.profiler's top operators for the step of one configuration.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step3_throughput import OPT_1_3B, OPT_350M, StubTokenizer  # noqa: E402
from rlhf_core.config import DeepSpeedConfig, ModelSpec, OptimizerConfig  # noqa: E402
from rlhf_core.engines.training import build_ds_config, init_distributed, initialize  # noqa: E402
from rlhf_core.models.causal_lm import build_causal_lm  # noqa: E402
from rlhf_core.models.reward_model import build_reward_model  # noqa: E402


class SizeTok(StubTokenizer):
    def __len__(self):
        return 50272


def timed_iterations(fwd_bwd, step, reps=6) -> tuple[float, float]:
    """Median ms of forward+backward and of the optimizer step, synchronised around each."""
    fb, st = [], []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i:
            fb.append(t1 - t0)
            st.append(time.perf_counter() - t1)
    return statistics.median(fb) * 1e3, statistics.median(st) * 1e3


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["actor", "critic"], default="actor")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--extra", default="{}", help="JSON deep-merged into the DeepSpeed config (deepspeed.extra)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one step")
    args = ap.parse_args()
    init_distributed("cuda")
    ids = torch.randint(3, 50000, (16, 512), device="cuda")
    mask = torch.ones_like(ids)
    name, arch, builder = {"actor": ("actor 1.3B", OPT_1_3B, build_causal_lm),
                           "critic": ("critic 350M", OPT_350M, build_reward_model)}[args.model]
    with torch.device("cuda"):
        model = builder(ModelSpec(architecture=arch, tokenizer="stub"), SizeTok(), dropout=0.0)
    opt = OptimizerConfig(lr=1e-6)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=args.zero, precision="bf16", gradient_clipping=args.clip,
                                         extra=json.loads(args.extra)), opt, 16, 1, 1)
    eng = initialize(model, ds, opt, 100)

    def fwd_bwd():
        out = eng(input_ids=ids, attention_mask=mask) if builder is build_causal_lm else eng(ids, mask)
        eng.backward((out.logits if hasattr(out, "logits") else out).float().mean())

    fb, st = timed_iterations(fwd_bwd, eng.step)
    print(f"| {name} | {args.zero} {args.extra} | {args.clip} | {fb:.0f} | {st:.0f} |", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            torch.cuda.synchronize()
        print("forward+backward:", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                            max_name_column_width=50))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eng.step()
            torch.cuda.synchronize()
        print("step:", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
