"""The Llama family: RMSNorm before each sublayer, rotary position embeddings (default RoPE only),
grouped-query attention, a SwiGLU MLP with gate and up projections fused."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Arch, Family, Weights, gathered, linear_weights, put_head, put_qkv_o, split_heads


@dataclass(frozen=True)
class LlamaArch(Arch):
    rope_theta: float = 10000.0


class Llama(Family):
    def __init__(self, arch: LlamaArch, device: torch.device, dtype: torch.dtype):
        super().__init__(arch, device, dtype)
        self.sdpa_scale = 1.0 / math.sqrt(arch.head_dim)
        inv = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
        freqs = torch.outer(torch.arange(arch.max_positions, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)  # [positions, D]

    @classmethod
    def arch_of(cls, config) -> LlamaArch | None:
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default" or config.hidden_act != "silu":
            return None
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return LlamaArch(cls, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                         config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                         config.max_position_embeddings, rope_theta=theta)

    def load(self, w: Weights, model: torch.nn.Module) -> None:
        m = model.model
        with gathered(m.embed_tokens), gathered(m.norm):
            w.put("embed", m.embed_tokens.weight.data)
            w.put("final_ln.w", m.norm.weight.data)
        for i, layer in enumerate(m.layers):
            with gathered(layer):
                att, mlp = layer.self_attn, layer.mlp
                q, k, v = (linear_weights(x) for x in (att.q_proj, att.k_proj, att.v_proj))
                put_qkv_o(w, i, q, k, v, linear_weights(att.o_proj))
                w.put(f"{i}.ln1.w", layer.input_layernorm.weight.data)
                w.put(f"{i}.ln2.w", layer.post_attention_layernorm.weight.data)
                g, u, d = (linear_weights(x) for x in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                w.put(f"{i}.gate_up.w", torch.cat([g[0], u[0]], 0))
                w.put(f"{i}.down.w", d[0])
        put_head(w, model.lm_head, m.embed_tokens)

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)

    def embed(self, w: Weights, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, w["embed"])

    def norm(self, w: Weights, x: torch.Tensor, name: str) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.arch.eps)
        return w[f"{name}.w"] * xf.to(dtype)

    def qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        q, k, v = split_heads(self.arch, q, k, v)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, S, D]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def mlp(self, w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, w[f"{i}.gate_up.w"]).chunk(2, -1)
        return F.linear(F.silu(gate) * up, w[f"{i}.down.w"])

    def final(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        return self.norm(w, x, "final_ln")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)
