"""Where a fast-path decode step's time goes: one CUDA-graph replay of the OPT-1.3B-shaped decoder.

    python benchmarks/decode_profile.py            # batches 32 128 256, attention sdpa and manual

Per (batch, KV bucket, attention): the median replay time of one decode step, the bytes it must move at
least (bf16 weights + the K/V of the bucket), and the bandwidth that implies against the measured copy
bandwidth. Ablation "no-attention" replaces attention by a copy of q (no K/V reads), so its difference to
the full step is the attention's cost (METHOD.md: time variants that leave one stage out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import os

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_core.engines.decode import FastDecoder, arch_of  # noqa: E402

OPT_1_3B = dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2048)


class NoAttention(FastDecoder):
    def _decode_attend(self, i, q, k, v, T_b):
        self.buffers.k[i].index_copy_(2, self.buffers.slot, k)
        return q.transpose(1, 2).reshape(q.shape[0], 1, -1)


def replay_ms(fd, T_b: int, graph, reps: int = 50) -> float:
    """Median replay time; every replay advances the write slot, so start far enough below the bucket's end."""
    fd.buffers.slot.fill_(T_b - reps - 6)
    fd.buffers.t.fill_(1)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    src = torch.empty(1 << 30, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        dst.copy_(src)
    e.record()
    torch.cuda.synchronize()
    copy_tb_s = 10 * 2 * src.numel() * 2 / (s.elapsed_time(e) / 1e3) / 1e12
    del src, dst
    config = AutoConfig.for_model("opt", **OPT_1_3B, pad_token_id=1, eos_token_id=2, bos_token_id=2)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    arch = arch_of(config)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    print(f"copy bandwidth {copy_tb_s:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB")
    print("| batch | bucket (KV len) | variant | step ms | min bytes GB | achieved TB/s | share of copy bw |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        ids = torch.randint(3, 50000, (B, 256), device="cuda")
        mask = torch.ones_like(ids)
        for variant, cls, att in (("sdpa", FastDecoder, "sdpa"), ("manual", FastDecoder, "manual"),
                                  ("no-attention", NoAttention, "sdpa")):
            fd = cls(arch, torch.device("cuda"), torch.bfloat16, 1, None, do_sample=True, attention=att)
            fd.load(model)
            torch.cuda.synchronize()
            t0 = __import__("time").perf_counter()
            fd.generate(ids, mask, 256)  # captures the graphs (and compiles, for "compiled")
            first = __import__("time").perf_counter() - t0
            t0 = __import__("time").perf_counter()
            fd.generate(ids, mask, 256)
            torch.cuda.synchronize()
            print(f"{variant} B={B}: first generate {first:.2f}s, next {__import__('time').perf_counter() - t0:.3f}s", flush=True)
            for T_b, graph in fd.buffers.graphs.items():
                ms = replay_ms(fd, T_b, graph)
                kv = 0 if variant == "no-attention" else 2 * arch.layers * B * T_b * arch.hidden * 2
                gb = (weight_bytes + kv) / 1e9
                print(f"| {B} | {T_b} | {variant} | {ms:.3f} | {gb:.2f} | {gb / ms:.2f} | {gb / ms / copy_tb_s:.0%} |")
            fd.release()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
