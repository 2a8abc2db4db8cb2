"""The generic static-shape decoder: prefill, decode steps (CUDA graphs per KV-length bucket), sampling.
What differs between model families (embeddings, norms, q/k/v post-processing, MLP, weight names) is asked
of ``arch.family`` (``base.Family``); everything a rollout allocates is in one ``DecodeBuffers``."""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Iterator

import torch
import torch.nn.functional as F

from .base import Arch, Weights

NEG_INF = float("-inf")


@dataclass(eq=False)
class DecodeBuffers:
    """Every tensor and graph a decoder holds between rollouts; ``release`` drops them all. The tensors a
    captured graph reads (weights, cache, state) must keep their storage while the graphs live: weights are
    refreshed in place, the rest is replaced (and the graphs with it) only when the shape changes."""

    weights: Weights
    shape: tuple[int, int, int] | None = None  # (batch B, prompt P, total T) the tensors below are sized for
    k: torch.Tensor | None = None  # key cache [layers, B, kv_heads, T, head_dim]
    v: torch.Tensor | None = None  # value cache, likewise
    tok: torch.Tensor | None = None  # [B] each row's last token, the next step's input
    pos: torch.Tensor | None = None  # [B] its position
    slot: torch.Tensor | None = None  # [1] the cache slot it is written to
    t: torch.Tensor | None = None  # [1] the answer index the next token is written to
    bias: torch.Tensor | None = None  # [B, T] attention bias: 0 on filled slots of real tokens, -inf elsewhere
    finished: torch.Tensor | None = None  # [B] the row has emitted EOS
    out: torch.Tensor | None = None  # [B, T - P] the answers
    logprobs: torch.Tensor | None = None  # [B, T - P] float32 log-prob of each answer token where it was drawn
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # KV bucket end -> captured step

    def release(self) -> None:
        """Drop everything (also for anyone still holding this object), graphs first: they read the rest."""
        self.graphs.clear()
        for f in fields(self):
            setattr(self, f.name, None)


class FastDecoder:
    """Static-batch generation with a KV cache; CUDA-graph-captured decode steps on CUDA devices."""

    def __init__(self, arch: Arch, device: torch.device, dtype: torch.dtype, pad_id: int, eos_id: int | None,
                 do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cuda_graphs: bool = True, bucket: int = 128, check_every: int = 16, attention: str = "sdpa"):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.family = arch.family(arch, device, dtype)
        self.pad_id = pad_id
        self.eos_id = eos_id if eos_id is not None else -1  # None: no end token, answers run to the limit
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.bucket, self.check_every, self.attention = bucket, check_every, attention
        self.buffers: DecodeBuffers | None = None  # from ``load`` to ``release``

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
        b = self.buffers
        own = [] if b is None else [*b.weights.t.values(), *(t for t in (b.k, b.v) if t is not None)]
        return free + cached + sum(t.numel() * t.element_size() for t in own)

    # ------------------------------------------------------------------ buffers and graphs
    def load(self, model: torch.nn.Module) -> None:
        """Read the (possibly LoRA-wrapped, possibly ZeRO-3-partitioned) model's weights, in place after the
        first time."""
        if self.buffers is None:
            self.buffers = DecodeBuffers(Weights(self.device, self.dtype))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family.load(self.buffers.weights, base)

    def release(self) -> None:
        """Free weights, cache and graphs (the next rollout loads again and recaptures)."""
        if self.buffers is not None:
            self.buffers.release()
            self.buffers = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sized(self, B: int, P: int, T: int) -> DecodeBuffers:
        """The buffers, with cache and state for (B, P, T): new ones (and no graphs) when the shape changed."""
        b = self.buffers
        if b.shape == (B, P, T):
            return b
        a, dev, weights = self.arch, self.device, b.weights
        b.release()  # graphs and the old cache go before the new cache comes
        k = torch.zeros(a.layers, B, a.kv_heads, T, a.head_dim, device=dev, dtype=self.dtype)
        self.buffers = DecodeBuffers(
            weights, (B, P, T), k, torch.zeros_like(k),
            tok=torch.zeros(B, dtype=torch.long, device=dev), pos=torch.zeros(B, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev), t=torch.zeros(1, dtype=torch.long, device=dev),
            bias=torch.full((B, T), NEG_INF, device=dev, dtype=self.dtype),
            finished=torch.zeros(B, dtype=torch.bool, device=dev),
            out=torch.full((B, T - P), self.pad_id, dtype=torch.long, device=dev),
            logprobs=torch.zeros(B, T - P, dtype=torch.float32, device=dev))
        return self.buffers

    def _buckets(self, P: int, T: int) -> list[int]:
        sizes = list(range(self.bucket, T, self.bucket)) + [T]
        return [s for s in sizes if s > P]

    def _capture(self, P: int, T: int) -> None:
        """One graph per KV-length bucket. Warm-up runs scribble on the state buffers; prefill resets them."""
        b = self.buffers
        pool = torch.cuda.graph_pool_handle()
        for T_b in self._buckets(P, T):
            b.slot.fill_(P)
            b.t.fill_(0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    b.slot.fill_(P)
                    b.t.fill_(0)
                    self._step(T_b)
            torch.cuda.current_stream().wait_stream(side)
            b.slot.fill_(P)
            b.t.fill_(0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(T_b)
            b.graphs[T_b] = graph

    # ----------------------------------------------------------------------------- maths
    def _layers(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The decoder stack; ``attend(i, q, k, v)`` writes the cache and returns attention [B, S, H*D]."""
        a, fam, w = self.arch, self.family, self.buffers.weights
        sizes = [a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim]
        for i in range(a.layers):
            h = fam.norm(w, x, f"{i}.ln1") if a.pre_ln else x
            q, k, v = fam.qkv(*F.linear(h, w[f"{i}.qkv.w"], w.get(f"{i}.qkv.b")).split(sizes, -1), pos)
            x = x + F.linear(attend(i, q, k, v), w[f"{i}.o.w"], w.get(f"{i}.o.b"))
            if not a.pre_ln:
                x = fam.norm(w, x, f"{i}.ln1")
            h = fam.norm(w, x, f"{i}.ln2") if a.pre_ln else x
            x = x + fam.mlp(w, i, h)
            if not a.pre_ln:
                x = fam.norm(w, x, f"{i}.ln2")
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.buffers.weights
        return F.linear(self.family.final(w, x), w["lm_head"]).float()

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row from logits [B, V] (float32): greedy, or temperature / top-k / top-p sampling
        by the Gumbel-max trick (argmax of logits + Gumbel noise is a sample of softmax(logits)). Also its
        log-prob under softmax(logits / temperature) (temperature 1 when greedy), the distribution step 3's
        old log-probs describe; top-k / top-p truncate the sampling, not that distribution."""
        if not self.do_sample:
            token = logits.argmax(-1)
            return token, _token_logprob(logits, token)
        logits = logits / self.temperature
        full = logits
        if self.top_k:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG_INF)
        if self.top_p < 1.0:
            ordered, idx = logits.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > self.top_p  # keep the smallest prefix holding top_p mass
            logits = torch.full_like(logits, NEG_INF).scatter(-1, idx, ordered.masked_fill(drop, NEG_INF))
        u = torch.rand_like(logits).clamp_(min=1e-20)
        token = (logits - torch.log(-torch.log(u))).argmax(-1)
        return token, _token_logprob(full, token)

    # --------------------------------------------------------------------------- phases
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the left-padded prompts [B, P], fill cache slots 0..P-1, pick the first new token."""
        b = self.buffers
        B, P = ids.shape
        mask = mask.bool()
        pos = self.family.positions(mask)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        allowed = causal[None] & mask[:, None, :]
        allowed |= torch.eye(P, dtype=torch.bool, device=ids.device)[None]  # a pad row sees itself, not nothing
        bias = torch.zeros(B, 1, P, P, device=ids.device, dtype=self.dtype).masked_fill(~allowed[:, None], NEG_INF)

        def attend(i, q, k, v):
            b.k[i, :, :, :P] = k
            b.v[i, :, :, :P] = v
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.family.sdpa_scale,
                                               enable_gqa=self.arch.kv_heads != self.arch.heads)
            return o.transpose(1, 2).reshape(B, P, -1)

        x = self._layers(self.family.embed(b.weights, ids, pos), pos.clamp(min=0), attend)
        first, first_logprob = self._sample(self._logits(x[:, -1]))
        b.bias.fill_(NEG_INF)
        b.bias[:, :P].masked_fill_(mask, 0.0)
        b.out.fill_(self.pad_id)
        b.out[:, 0] = first
        b.logprobs.zero_()
        b.logprobs[:, 0] = first_logprob
        b.finished.copy_(first == self.eos_id)
        b.tok.copy_(first)
        b.pos.copy_(mask.long().sum(-1))
        b.slot.fill_(P)
        b.t.fill_(1)

    def _decode_attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T_b: int) -> torch.Tensor:
        """Write this token's k, v at the current slot; attend over slots [0, T_b). q [B, H, 1, D]."""
        b, B, scale = self.buffers, q.shape[0], self.family.sdpa_scale
        b.k[i].index_copy_(2, b.slot, k)
        b.v[i].index_copy_(2, b.slot, v)
        keys, values, bias = b.k[i, :, :, :T_b], b.v[i, :, :, :T_b], b.bias[:, None, None, :T_b]
        if self.attention == "manual":  # two batched GEMVs around a softmax (q is one token)
            a = self.arch
            # Head h uses key/value group h // G, as transformers' repeat_kv lays them out.
            qg = q.reshape(B, a.kv_heads, a.heads // a.kv_heads, a.head_dim)  # [B, KVH, G, D]
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale + bias
            o = torch.matmul(scores.float().softmax(-1).to(values.dtype), values)  # [B, KVH, G, D]
            return o.reshape(B, 1, -1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale,
                                           enable_gqa=self.arch.kv_heads != self.arch.heads)
        return o.transpose(1, 2).reshape(B, 1, -1)

    def _step(self, T_b: int) -> None:
        """One decode step for the whole batch, entirely on the device (what a graph captures)."""
        b = self.buffers
        b.bias.index_fill_(1, b.slot, 0.0)
        pos = b.pos[:, None]
        x = self._layers(self.family.embed(b.weights, b.tok[:, None], pos), pos,
                         lambda i, q, k, v: self._decode_attend(i, q, k, v, T_b))
        nxt, logprob = self._sample(self._logits(x[:, 0]))
        nxt = torch.where(b.finished, torch.full_like(nxt, self.pad_id), nxt)
        logprob = logprob.masked_fill(b.finished, 0.0)
        b.finished |= nxt == self.eos_id
        b.out.index_copy_(1, b.t, nxt[:, None])
        b.logprobs.index_copy_(1, b.t, logprob[:, None])
        b.tok.copy_(nxt)
        b.pos.add_(1)
        b.slot.add_(1)
        b.t.add_(1)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, with_logprobs: bool = False,
                 timer=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Answers [B, max_new_tokens] for left-padded prompts; pad after each answer's first EOS. With
        ``with_logprobs``, also each answer token's log-prob [B, max_new_tokens] (0 after the end). ``timer``
        (a ``Timer``, optional) times the phases: graph capture, prefill, decode (a host-device sync each)."""
        phase = timer if timer is not None else (lambda name: nullcontext())
        B, P = ids.shape
        T = P + max_new_tokens
        if T > self.arch.max_positions:
            raise ValueError(f"prompt {P} + answer {max_new_tokens} tokens exceed the model's {self.arch.max_positions} positions")
        if self.buffers is None:
            raise RuntimeError("no weights: call load(model) before generate (and after release)")
        with _capturable_kernels():
            b = self._sized(B, P, T)
            if self.use_graphs and not b.graphs:
                with phase("generate/capture"):
                    self._capture(P, T)
            with phase("generate/prefill"):
                self._prefill(ids.to(self.device), mask.to(self.device))
            with phase("generate/decode"):
                for step in range(1, max_new_tokens):
                    slot = P + step - 1  # where this step writes the previous token
                    if step % self.check_every == 0 and bool(b.finished.all()):  # host-device sync, now and then
                        break
                    if self.use_graphs:
                        T_b = next(x for x in b.graphs if x > slot)
                        b.graphs[T_b].replay()
                    else:
                        self._step(T)
        return (b.out.clone(), b.logprobs.clone()) if with_logprobs else b.out.clone()


@contextmanager
def _capturable_kernels() -> Iterator[None]:
    """Decoding with torch's global deterministic mode (RLHF_DETERMINISTIC) off: a forward pass has no
    atomics, so its kernels are deterministic as they are, while the mode's replacements (and its filling of
    new memory) are not all capturable in a CUDA graph."""
    on, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if not on:
        yield
        return
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn)


def _token_logprob(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row ([B, V], [B] -> [B]), without materialising the log-softmax."""
    return logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
