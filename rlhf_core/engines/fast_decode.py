"""Fast generation for step 3: a static-shape decoder over the actor's full weights.

Generation is memory-bandwidth bound: every new token reads all weights and the KV cache. So, per rollout:

* the full weights are read out of the training module once (under ZeRO-3 gathered one layer at a time,
  once per rollout, not per layer per token), LoRA merged, cast to the generation dtype (bf16 on GPUs), and
  copied *in place* into buffers that persist across rollouts;
* prompts are run through once (prefill) into a static KV cache sized to the batch;
* each decode step is one replay of a CUDA graph (no per-kernel launch cost, no host sync), with one graph
  per KV-length bucket so attention reads only the part of the cache in use; sampling (temperature,
  top-k, top-p via the Gumbel-max trick) runs inside the graph;
* finished sequences keep their slot (static shapes) but emit pad; the host looks at "all finished" only
  every ``check_every`` steps.

The model families implemented here are OPT (pre- and post-LayerNorm, with projections, as in OPT-350M)
and Llama (RoPE, grouped-query attention, SwiGLU); ``arch_of`` returns None for anything else and the
caller falls back to transformers ``generate``. On CPU the same code runs eagerly, without graphs.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Arch:
    family: str  # "opt" | "llama"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    pre_ln: bool = True  # OPT: do_layer_norm_before (False for OPT-350M)
    act: str = "relu"
    rope_theta: float = 10000.0


def arch_of(config) -> Arch | None:
    """The decoder layout of a transformers config, or None when this module does not implement it."""
    mt = getattr(config, "model_type", None)
    if mt == "opt":
        if config.activation_function not in ("relu", "gelu"):
            return None
        return Arch("opt", config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                    config.num_attention_heads, config.hidden_size // config.num_attention_heads, config.vocab_size,
                    1e-5, config.max_position_embeddings, pre_ln=config.do_layer_norm_before,
                    act=config.activation_function)
    if mt == "llama":
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default" or config.hidden_act != "silu":
            return None
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return Arch("llama", config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                    config.num_key_value_heads, head_dim, config.vocab_size, config.rms_norm_eps,
                    config.max_position_embeddings, act="silu", rope_theta=theta)
    return None


# ------------------------------------------------------------------------------------------------ weights


@contextmanager
def _gathered(module: torch.nn.Module) -> Iterator[None]:
    """Full parameters of ``module`` for the duration (ZeRO-3 partitions are gathered; others untouched)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _linear(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None], 0)


class Weights:
    """Named generation weights in persistent buffers; ``load`` copies new values in place, so tensors a
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


def fold_scale(arch: Arch) -> float | None:
    """OPT multiplies q by 1/sqrt(head_dim) after its projection. When that is a power of two (head_dim 16,
    64, 256...) multiplying the weights and bias instead is exact in every float format, and saves a kernel
    per layer and step."""
    if arch.family != "opt":
        return None
    scale = arch.head_dim ** -0.5
    return scale if math.log2(scale).is_integer() else None


def load_weights(w: Weights, arch: Arch, model: torch.nn.Module) -> None:
    """Read the (possibly LoRA-wrapped, possibly ZeRO-3-partitioned) model into ``w``."""
    folded = fold_scale(arch)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if arch.family == "opt":
        dec = base.model.decoder
        with _gathered(dec.embed_tokens), _gathered(dec.embed_positions):
            w.put("embed", dec.embed_tokens.weight.data)
            w.put("pos", dec.embed_positions.weight.data)
        for name in ("project_in", "project_out"):
            mod = getattr(dec, name, None)
            if mod is not None:
                with _gathered(mod):
                    w.put(name, _linear(mod)[0])
        if dec.final_layer_norm is not None:
            with _gathered(dec.final_layer_norm):
                w.put("final_ln.w", dec.final_layer_norm.weight.data)
                w.put("final_ln.b", dec.final_layer_norm.bias.data)
        for i, layer in enumerate(dec.layers):
            with _gathered(layer):
                att = layer.self_attn
                q, k, v = (_linear(m) for m in (att.q_proj, att.k_proj, att.v_proj))
                if folded is not None:
                    q = (q[0] * folded, q[1] * folded if q[1] is not None else None)
                w.put(f"{i}.qkv.w", torch.cat([q[0], k[0], v[0]], 0))
                w.put(f"{i}.qkv.b", _cat([q[1], k[1], v[1]]))
                o = _linear(att.out_proj)
                w.put(f"{i}.o.w", o[0])
                w.put(f"{i}.o.b", o[1])
                for name, mod in (("ln1", layer.self_attn_layer_norm), ("ln2", layer.final_layer_norm)):
                    w.put(f"{i}.{name}.w", mod.weight.data)
                    w.put(f"{i}.{name}.b", mod.bias.data)
                for name in ("fc1", "fc2"):
                    wt, b = _linear(getattr(layer, name))
                    w.put(f"{i}.{name}.w", wt)
                    w.put(f"{i}.{name}.b", b)
        embed = dec.embed_tokens
    else:
        m = base.model
        with _gathered(m.embed_tokens), _gathered(m.norm):
            w.put("embed", m.embed_tokens.weight.data)
            w.put("final_ln.w", m.norm.weight.data)
        for i, layer in enumerate(m.layers):
            with _gathered(layer):
                att, mlp = layer.self_attn, layer.mlp
                q, k, v = (_linear(x) for x in (att.q_proj, att.k_proj, att.v_proj))
                w.put(f"{i}.qkv.w", torch.cat([q[0], k[0], v[0]], 0))
                w.put(f"{i}.qkv.b", _cat([q[1], k[1], v[1]]))
                o = _linear(att.o_proj)
                w.put(f"{i}.o.w", o[0])
                w.put(f"{i}.o.b", o[1])
                w.put(f"{i}.ln1.w", layer.input_layernorm.weight.data)
                w.put(f"{i}.ln2.w", layer.post_attention_layernorm.weight.data)
                g, u, d = (_linear(x) for x in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                w.put(f"{i}.gate_up.w", torch.cat([g[0], u[0]], 0))
                w.put(f"{i}.down.w", d[0])
        embed = m.embed_tokens
    head = base.lm_head
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        w.t["lm_head"] = w["embed"]  # tied: one buffer
    else:
        with _gathered(head):
            w.put("lm_head", _linear(head)[0])


# ----------------------------------------------------------------------------------------------- decoder


class FastDecoder:
    """Static-batch generation with a KV cache; CUDA-graph-captured decode steps on CUDA devices."""

    def __init__(self, arch: Arch, device: torch.device, dtype: torch.dtype, pad_id: int, eos_id: int | None,
                 do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cuda_graphs: bool = True, bucket: int = 128, check_every: int = 16, attention: str = "sdpa"):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.pad_id = pad_id
        self.eos_id = eos_id if eos_id is not None else -1  # None: no end token, answers run to the limit
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.bucket, self.check_every, self.attention = bucket, check_every, attention
        self.q_folded = fold_scale(arch) is not None
        self.w = Weights(device, dtype)
        self._shape: tuple[int, int, int] | None = None  # (batch, prompt, total) of the buffers
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.scale = 1.0 / math.sqrt(arch.head_dim)
        if arch.family == "llama":
            inv = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
            freqs = torch.outer(torch.arange(arch.max_positions, dtype=torch.float32), inv)
            emb = torch.cat([freqs, freqs], -1)
            self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)

    # ------------------------------------------------------------------ memory
    def bytes_needed(self, model: torch.nn.Module, B: int, P: int, T: int) -> int:
        """Device bytes one rollout of B rows, P prompt and T total positions takes (an estimate): the whole
        weights in this decoder's dtype (LoRA merged, so adapters do not count), the KV cache, and the
        prefill's activations (about 16 x hidden per prompt token) with float32 logits for sampling."""
        a, elt = self.arch, torch.finfo(self.dtype).bits // 8
        weights = sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if "lora_" not in n)
        kv = 2 * a.layers * B * a.kv_heads * T * a.head_dim
        prefill = 16 * B * P * a.hidden
        return (weights + kv + prefill) * elt + 4 * B * a.vocab

    def bytes_available(self) -> int:
        """Device bytes this decoder may use: free memory, the allocator's unused cache, and its own buffers
        (refreshed in place). Unbounded on CPU."""
        if self.device.type != "cuda":
            return sys.maxsize
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        own = [*self.w.t.values(), *(self.__dict__[n] for n in ("k", "v") if n in self.__dict__)]
        return free + cached + sum(t.numel() * t.element_size() for t in own)

    # ------------------------------------------------------------------ buffers and graphs
    def load(self, model: torch.nn.Module) -> None:
        load_weights(self.w, self.arch, model)

    def release(self) -> None:
        """Free weights, cache and graphs (the next ``generate`` reloads and recaptures)."""
        self._graphs.clear()
        self.w.t.clear()
        for name in ("k", "v", "tok", "pos", "slot", "t", "bias", "finished", "out"):
            self.__dict__.pop(name, None)
        self._shape = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _buffers(self, B: int, P: int, T: int) -> None:
        if self._shape == (B, P, T):
            return
        a, dev = self.arch, self.device
        self._graphs.clear()
        self.k = torch.zeros(a.layers, B, a.kv_heads, T, a.head_dim, device=dev, dtype=self.dtype)
        self.v = torch.zeros_like(self.k)
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.bias = torch.full((B, T), NEG_INF, device=dev, dtype=self.dtype)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, T - P), self.pad_id, dtype=torch.long, device=dev)
        self._shape = (B, P, T)

    def _buckets(self, P: int, T: int) -> list[int]:
        sizes = list(range(self.bucket, T, self.bucket)) + [T]
        return [s for s in sizes if s > P]

    def _capture(self, P: int, T: int) -> None:
        """One graph per KV-length bucket. Warm-up runs scribble on the state buffers; prefill resets them."""
        pool = torch.cuda.graph_pool_handle()
        for T_b in self._buckets(P, T):
            self.slot.fill_(P)
            self.t.fill_(0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.slot.fill_(P)
                    self.t.fill_(0)
                    self._step(T_b)
            torch.cuda.current_stream().wait_stream(side)
            self.slot.fill_(P)
            self.t.fill_(0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(T_b)
            self._graphs[T_b] = graph

    # ----------------------------------------------------------------------------- maths
    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.arch.family == "opt":
            return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.w"], self.w[f"{name}.b"], self.arch.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.arch.eps)
        return self.w[f"{name}.w"] * xf.to(dtype)

    def _qkv(self, i: int, h: torch.Tensor, pos: torch.Tensor):
        """h [B, S, hidden] -> q [B, H, S, D], k and v [B, KVH, S, D] (RoPE applied for Llama)."""
        a = self.arch
        B, S, _ = h.shape
        qkv = F.linear(h, self.w[f"{i}.qkv.w"], self.w.get(f"{i}.qkv.b"))
        q, k, v = qkv.split([a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim], -1)
        if a.family == "opt" and not self.q_folded:
            q = q * self.scale  # OPT scales q after the projection (bias included), as transformers does
        q = q.view(B, S, a.heads, a.head_dim).transpose(1, 2)
        k = k.view(B, S, a.kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(B, S, a.kv_heads, a.head_dim).transpose(1, 2)
        if a.family == "llama":
            cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, S, D]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return q, k, v

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.arch.family == "opt":
            w1, b1 = self.w[f"{i}.fc1.w"], self.w.get(f"{i}.fc1.b")
            if b1 is not None and h.is_cuda:
                # bias and activation in the GEMM's epilogue: one kernel instead of three
                x = torch._addmm_activation(b1, h.reshape(-1, h.shape[-1]), w1.t(), use_gelu=self.arch.act == "gelu")
                x = x.view(*h.shape[:-1], -1)
            else:
                x = F.linear(h, w1, b1)
                x = F.relu(x) if self.arch.act == "relu" else F.gelu(x)
            return F.linear(x, self.w[f"{i}.fc2.w"], self.w.get(f"{i}.fc2.b"))
        gate, up = F.linear(h, self.w[f"{i}.gate_up.w"]).chunk(2, -1)
        return F.linear(F.silu(gate) * up, self.w[f"{i}.down.w"])

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The decoder stack; ``attend(i, q, k, v)`` writes the cache and returns attention [B, S, H*D]."""
        pre = self.arch.pre_ln or self.arch.family == "llama"
        for i in range(self.arch.layers):
            h = self._norm(x, f"{i}.ln1") if pre else x
            q, k, v = self._qkv(i, h, pos)
            x = x + F.linear(attend(i, q, k, v), self.w[f"{i}.o.w"], self.w.get(f"{i}.o.b"))
            if not pre:
                x = self._norm(x, f"{i}.ln1")
            h = self._norm(x, f"{i}.ln2") if pre else x
            x = x + self._mlp(i, h)
            if not pre:
                x = self._norm(x, f"{i}.ln2")
        return x

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.w["embed"])
        if self.arch.family == "opt":
            if self.w.get("project_in") is not None:
                x = F.linear(x, self.w["project_in"])
            x = x + F.embedding(pos + 2, self.w["pos"])  # OPT's learned positions are offset by 2
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.get("final_ln.w") is not None:
            x = self._norm(x, "final_ln")
        if self.w.get("project_out") is not None:
            x = F.linear(x, self.w["project_out"])
        return F.linear(x, self.w["lm_head"]).float()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from logits [B, V] (float32): greedy, or temperature / top-k / top-p sampling
        by the Gumbel-max trick (argmax of logits + Gumbel noise is a sample of softmax(logits))."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG_INF)
        if self.top_p < 1.0:
            ordered, idx = logits.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > self.top_p  # keep the smallest prefix holding top_p mass
            logits = torch.full_like(logits, NEG_INF).scatter(-1, idx, ordered.masked_fill(drop, NEG_INF))
        u = torch.rand_like(logits).clamp_(min=1e-20)
        return (logits - torch.log(-torch.log(u))).argmax(-1)

    # --------------------------------------------------------------------------- phases
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the left-padded prompts [B, P], fill cache slots 0..P-1, pick the first new token."""
        B, P = ids.shape
        mask = mask.bool()
        if self.arch.family == "opt":
            pos = (mask.long().cumsum(-1) * mask - 1)  # transformers' OPT positions (pads at -1)
        else:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        allowed = causal[None] & mask[:, None, :]
        allowed |= torch.eye(P, dtype=torch.bool, device=ids.device)[None]  # a pad row sees itself, not nothing
        bias = torch.zeros(B, 1, P, P, device=ids.device, dtype=self.dtype).masked_fill(~allowed[:, None], NEG_INF)

        def attend(i, q, k, v):
            self.k[i, :, :, :P] = k
            self.v[i, :, :, :P] = v
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self._sdpa_scale(),
                                               enable_gqa=self.arch.kv_heads != self.arch.heads)
            return o.transpose(1, 2).reshape(B, P, -1)

        x = self._layers(self._embed(ids, pos), pos.clamp(min=0), attend)
        first = self._sample(self._logits(x[:, -1]))
        self.bias.fill_(NEG_INF)
        self.bias[:, :P].masked_fill_(mask, 0.0)
        self.out.fill_(self.pad_id)
        self.out[:, 0] = first
        self.finished.copy_(first == self.eos_id)
        self.tok.copy_(first)
        self.pos.copy_(mask.long().sum(-1))
        self.slot.fill_(P)
        self.t.fill_(1)

    def _sdpa_scale(self) -> float:
        return 1.0 if self.arch.family == "opt" else self.scale

    def _decode_attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T_b: int) -> torch.Tensor:
        """Write this token's k, v at the current slot; attend over slots [0, T_b). q [B, H, 1, D]."""
        B = q.shape[0]
        self.k[i].index_copy_(2, self.slot, k)
        self.v[i].index_copy_(2, self.slot, v)
        keys, values, bias = self.k[i, :, :, :T_b], self.v[i, :, :, :T_b], self.bias[:, None, None, :T_b]
        if self.attention == "manual":  # two batched GEMVs around a softmax (q is one token)
            a = self.arch
            # Head h uses key/value group h // G, as transformers' repeat_kv lays them out.
            qg = q.reshape(B, a.kv_heads, a.heads // a.kv_heads, a.head_dim)  # [B, KVH, G, D]
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self._sdpa_scale() + bias
            o = torch.matmul(scores.float().softmax(-1).to(values.dtype), values)  # [B, KVH, G, D]
            return o.reshape(B, 1, -1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self._sdpa_scale(),
                                           enable_gqa=self.arch.kv_heads != self.arch.heads)
        return o.transpose(1, 2).reshape(B, 1, -1)

    def _step(self, T_b: int) -> None:
        """One decode step for the whole batch, entirely on the device (what a graph captures)."""
        self.bias.index_fill_(1, self.slot, 0.0)
        pos = self.pos[:, None]
        x = self._layers(self._embed(self.tok[:, None], pos), pos,
                         lambda i, q, k, v: self._decode_attend(i, q, k, v, T_b))
        nxt = self._sample(self._logits(x[:, 0]))
        nxt = torch.where(self.finished, torch.full_like(nxt, self.pad_id), nxt)
        self.finished |= nxt == self.eos_id
        self.out.index_copy_(1, self.t, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.slot.add_(1)
        self.t.add_(1)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Answers [B, max_new_tokens] for left-padded prompts; pad after each answer's first EOS."""
        B, P = ids.shape
        T = P + max_new_tokens
        if T > self.arch.max_positions:
            raise ValueError(f"prompt {P} + answer {max_new_tokens} tokens exceed the model's {self.arch.max_positions} positions")
        self._buffers(B, P, T)
        if self.use_graphs and not self._graphs:
            self._capture(P, T)
        self._prefill(ids.to(self.device), mask.to(self.device))
        for step in range(1, max_new_tokens):
            slot = P + step - 1  # where this step writes the previous token
            if step % self.check_every == 0 and bool(self.finished.all()):  # host-device sync, now and then
                break
            if self.use_graphs:
                T_b = next(b for b in self._graphs if b > slot)
                self._graphs[T_b].replay()
            else:
                self._step(T)
        return self.out.clone()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


__all__ = ["Arch", "FastDecoder", "Weights", "arch_of", "load_weights"]
