"""What the generic decoder and the model families share: the layout ``Arch``, the ``Family`` interface a
model family implements, the named weight buffers ``Weights``, and helpers to read a (LoRA-wrapped,
ZeRO-3-partitioned) transformers module."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Arch:
    """The decoder layout of one model; a family subclasses it for options of its own."""

    family: type[Family]  # the family that implements it
    layers: int
    hidden: int
    heads: int
    kv_heads: int  # < heads: grouped-query attention (head h reads key/value group h // (heads // kv_heads))
    head_dim: int
    vocab: int
    eps: float  # of the norms
    max_positions: int
    pre_ln: bool = True  # norm before each sublayer (False: after the residual add, as in OPT-350M)


class Weights:
    """Named generation weights in persistent buffers; ``put`` copies new values in place, so tensors a
    captured graph reads stay where they are."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.t: dict[str, torch.Tensor] = {}

    def put(self, name: str, value: torch.Tensor | None) -> None:
        if value is None:
            return
        value = value.detach()
        buf = self.t.get(name)
        if buf is None or buf.shape != value.shape:
            self.t[name] = value.to(self.device, self.dtype, copy=True).contiguous()
        else:
            buf.copy_(value)

    def get(self, name: str) -> torch.Tensor | None:
        return self.t.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]


class Family(ABC):
    """One model family (OPT, Llama, ...) as the generic decoder sees it: one subclass per family, in a
    file of its own, registered in ``rlhf_core.engines.decode.FAMILIES`` under its transformers
    ``model_type``.

    The decoder makes one instance, ``Family(arch, device, dtype)``; it may keep constant tensors (Llama's
    RoPE tables), never per-rollout state (that is ``DecodeBuffers``'). Everything it computes must run
    on the device without host syncs, since decode steps are captured in CUDA graphs.

    Weight names: ``load`` writes, and the other methods read, names of the family's choosing, except the
    ones the generic decoder itself reads: ``{i}.qkv.w`` and optional ``{i}.qkv.b`` (layer i's fused q, k,
    v projection, rows in that order), ``{i}.o.w`` and optional ``{i}.o.b`` (attention output) and
    ``lm_head``; and it asks ``norm`` for ``{i}.ln1`` (attention's norm) and ``{i}.ln2`` (the MLP's).
    """

    sdpa_scale: float  # what attention multiplies q @ k^T by (1.0 when ``qkv`` scaled q itself)

    def __init__(self, arch: Arch, device: torch.device, dtype: torch.dtype):
        self.arch, self.device, self.dtype = arch, device, dtype

    @classmethod
    @abstractmethod
    def arch_of(cls, config) -> Arch | None:
        """The layout of a transformers config of this family (``family=cls``), or None for a variant the
        methods below do not implement (the caller then generates with transformers)."""

    @abstractmethod
    def load(self, w: Weights, model: torch.nn.Module) -> None:
        """Copy the LoRA-unwrapped transformers model's weights into ``w``: each module inside
        ``gathered``, Linear layers through ``linear_weights`` (LoRA merged), the head through ``put_head``."""

    @abstractmethod
    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Prefill positions [B, P] of left-padded prompts (``mask`` bool): what ``embed`` takes; the layers
        get them clamped at 0. (A decode step's position is the row's count of tokens so far.)"""

    @abstractmethod
    def embed(self, w: Weights, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] at positions [B, S] -> hidden states [B, S, hidden]."""

    @abstractmethod
    def norm(self, w: Weights, x: torch.Tensor, name: str) -> torch.Tensor:
        """The norm whose weights are stored under ``name`` applied to x [..., hidden]."""

    @abstractmethod
    def qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """The fused projection's parts q [B, S, heads * D], k and v [B, S, kv_heads * D] at positions
        pos [B, S] -> q [B, heads, S, D], k and v [B, kv_heads, S, D] ready for attention (``split_heads``,
        then e.g. rotary embeddings)."""

    @abstractmethod
    def mlp(self, w: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's feed-forward block on its normed input h [B, S, hidden]."""

    @abstractmethod
    def final(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output [B, hidden] -> the input of ``lm_head`` (final norm, projections)."""


def split_heads(arch: Arch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[B, S, heads * D] and [B, S, kv_heads * D] -> [B, heads, S, D] and [B, kv_heads, S, D]."""
    B, S, _ = q.shape
    q = q.view(B, S, arch.heads, arch.head_dim).transpose(1, 2)
    k = k.view(B, S, arch.kv_heads, arch.head_dim).transpose(1, 2)
    v = v.view(B, S, arch.kv_heads, arch.head_dim).transpose(1, 2)
    return q, k, v


# ------------------------------------------------------------------------------------ reading weights


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Full parameters of ``module`` for the duration (ZeRO-3 partitions are gathered; others untouched)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def linear_weights(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear, with active LoRA adapters merged: W + scaling * B @ A."""
    base = getattr(mod, "base_layer", mod)
    weight = base.weight.data
    lora_a = getattr(mod, "lora_A", None)
    if lora_a:
        if any(getattr(mod, "use_dora", {}).get(a, False) for a in mod.active_adapters):
            raise NotImplementedError("DoRA adapters are not supported by the fast generation path")
        weight = weight.float()
        for name in mod.active_adapters:
            if name in lora_a:
                delta = mod.lora_B[name].weight.data.float() @ lora_a[name].weight.data.float()
                weight = weight + delta * mod.scaling[name]
    bias = base.bias.data if base.bias is not None else None
    return weight, bias


def cat_rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Biases of fused projections, concatenated (None when none of them has one)."""
    if all(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None], 0)


def put_qkv_o(w: Weights, i: int, q, k, v, o) -> None:
    """Layer i's attention projections, each a (weight, bias) pair: q, k, v fused, and the output."""
    w.put(f"{i}.qkv.w", torch.cat([q[0], k[0], v[0]], 0))
    w.put(f"{i}.qkv.b", cat_rows([q[1], k[1], v[1]]))
    w.put(f"{i}.o.w", o[0])
    w.put(f"{i}.o.b", o[1])


def put_head(w: Weights, head: torch.nn.Module, embed: torch.nn.Module) -> None:
    """``lm_head``: the embedding's buffer when the two are tied, else its own (after ``embed`` is put)."""
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        w.t["lm_head"] = w["embed"]  # tied: one buffer
    else:
        with gathered(head):
            w.put("lm_head", linear_weights(head)[0])
