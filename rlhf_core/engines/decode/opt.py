"""The OPT family: learned positions (offset by 2), LayerNorm with bias before or after each sublayer (after
in OPT-350M, which also projects its embeddings in and out), q scaled after its projection, fc1/fc2 MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Arch, Family, Weights, gathered, linear_weights, put_head, put_qkv_o, split_heads


@dataclass(frozen=True)
class OPTArch(Arch):
    act: str = "relu"  # of fc1: "relu" or "gelu"


def fold_scale(arch: Arch) -> float | None:
    """OPT multiplies q by 1/sqrt(head_dim) after its projection. When that is a power of two (head_dim 16,
    64, 256...) multiplying the weights and bias instead is exact in every float format, and saves a kernel
    per layer and step."""
    scale = arch.head_dim ** -0.5
    return scale if math.log2(scale).is_integer() else None


class OPT(Family):
    def __init__(self, arch: OPTArch, device: torch.device, dtype: torch.dtype):
        super().__init__(arch, device, dtype)
        self.scale = 1.0 / math.sqrt(arch.head_dim)
        self.q_folded = fold_scale(arch) is not None
        self.sdpa_scale = 1.0  # q is scaled already, in its weights or by ``qkv``

    @classmethod
    def arch_of(cls, config) -> OPTArch | None:
        if config.activation_function not in ("relu", "gelu"):
            return None
        heads = config.num_attention_heads
        return OPTArch(cls, config.num_hidden_layers, config.hidden_size, heads, heads, config.hidden_size // heads,
                       config.vocab_size, 1e-5, config.max_position_embeddings, pre_ln=config.do_layer_norm_before,
                       act=config.activation_function)

    def load(self, w: Weights, model: torch.nn.Module) -> None:
        folded = fold_scale(self.arch)
        dec = model.model.decoder
        with gathered(dec.embed_tokens), gathered(dec.embed_positions):
            w.put("embed", dec.embed_tokens.weight.data)
            w.put("pos", dec.embed_positions.weight.data)
        for name in ("project_in", "project_out"):
            mod = getattr(dec, name, None)
            if mod is not None:
                with gathered(mod):
                    w.put(name, linear_weights(mod)[0])
        if dec.final_layer_norm is not None:
            with gathered(dec.final_layer_norm):
                w.put("final_ln.w", dec.final_layer_norm.weight.data)
                w.put("final_ln.b", dec.final_layer_norm.bias.data)
        for i, layer in enumerate(dec.layers):
            with gathered(layer):
                att = layer.self_attn
                q, k, v = (linear_weights(m) for m in (att.q_proj, att.k_proj, att.v_proj))
                if folded is not None:
                    q = (q[0] * folded, q[1] * folded if q[1] is not None else None)
                put_qkv_o(w, i, q, k, v, linear_weights(att.out_proj))
                for name, mod in (("ln1", layer.self_attn_layer_norm), ("ln2", layer.final_layer_norm)):
                    w.put(f"{i}.{name}.w", mod.weight.data)
                    w.put(f"{i}.{name}.b", mod.bias.data)
                for name in ("fc1", "fc2"):
                    wt, b = linear_weights(getattr(layer, name))
                    w.put(f"{i}.{name}.w", wt)
                    w.put(f"{i}.{name}.b", b)
        put_head(w, model.lm_head, dec.embed_tokens)

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.long().cumsum(-1) * mask - 1  # transformers' OPT positions (pads at -1)

    def embed(self, w: Weights, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, w["embed"])
        if w.get("project_in") is not None:
            x = F.linear(x, w["project_in"])
        return x + F.embedding(pos + 2, w["pos"])  # OPT's learned positions are offset by 2

    def norm(self, w: Weights, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w[f"{name}.w"], w[f"{name}.b"], self.arch.eps)

    def qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        if not self.q_folded:
            q = q * self.scale  # OPT scales q after the projection (bias included), as transformers does
        return split_heads(self.arch, q, k, v)

    def mlp(self, w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
        w1, b1 = w[f"{i}.fc1.w"], w.get(f"{i}.fc1.b")
        if b1 is not None and h.is_cuda:
            # bias and activation in the GEMM's epilogue: one kernel instead of three
            x = torch._addmm_activation(b1, h.reshape(-1, h.shape[-1]), w1.t(), use_gelu=self.arch.act == "gelu")
            x = x.view(*h.shape[:-1], -1)
        else:
            x = F.linear(h, w1, b1)
            x = F.relu(x) if self.arch.act == "relu" else F.gelu(x)
        return F.linear(x, w[f"{i}.fc2.w"], w.get(f"{i}.fc2.b"))

    def final(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        if w.get("final_ln.w") is not None:
            x = self.norm(w, x, "final_ln")
        if w.get("project_out") is not None:
            x = F.linear(x, w["project_out"])
        return x
