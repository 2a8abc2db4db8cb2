"""The hybrid engine: the actor switches between DeepSpeed training and generation.

``HybridEngine.generate`` is the one interface step 3 uses for rollouts. With ``hybrid_engine.enabled``
and a supported architecture (OPT, Llama) it takes the fast path (``rlhf_core.engines.decode``): the
training module's weights are read once per rollout (gathered under ZeRO-3, LoRA merged, bf16 on GPUs)
into a static-shape decoder with a KV cache and CUDA-graph decode steps (in chunks of at most
``max_batch`` rows), and released again before training resumes (``release_memory``). Otherwise, or with
``enabled: false``, it calls transformers ``generate`` on the training module (under ZeRO-3 that gathers
each layer for every token: correct, slow).
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_core.config import GenerationConfig, HybridEngineConfig
from rlhf_core.models.loading import torch_dtype


@dataclass(frozen=True)
class Rollout:
    sequences: torch.Tensor  # [B, P + A] left-padded prompt, then the answer right-padded with pad
    attention_mask: torch.Tensor  # [B, P + A]
    response_mask: torch.Tensor  # [B, A] 1 up to and including the first EOS
    prompt_len: int  # P
    logprobs: torch.Tensor | None = None  # [B, A] float32 log-prob of each answer token as it was sampled
    # (fast path only; at the sampling temperature, 0 after the end), for rl.old_logprobs: rollout

    @property
    def responses(self) -> torch.Tensor:  # [B, A]
        return self.sequences[:, self.prompt_len:]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu",
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [B, P] (P = the longest row, or ``length``)."""
    P = length or max(map(len, rows))
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.tensor(r)
            mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def response_mask_from(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 on answer tokens up to and including the first EOS, 0 after ([B, A] -> [B, A], long).

    Equals, per row, ``[1] * (first_eos + 1) + [0] * rest`` (or all ones without an EOS, or when there is
    no end token at all, as in throughput benchmarks).
    """
    if eos_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_id).long()
    after_first = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_first).long()


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0 (as ``generate`` does)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


_ACCEPTS: dict[tuple[type, str], bool] = {}


def accepts(model, arg: str) -> bool:
    """Whether the (unwrapped, LoRA-unwrapped) model's forward takes ``arg`` (cached per class)."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    key = (type(base), arg)
    if key not in _ACCEPTS:
        _ACCEPTS[key] = arg in inspect.signature(base.forward).parameters
    return _ACCEPTS[key]


def unwrap(engine_or_module) -> torch.nn.Module:
    return getattr(engine_or_module, "module", engine_or_module)


class HybridEngine:
    """Generation for step 3 from the actor's DeepSpeed engine (or any causal LM module)."""

    def __init__(self, actor_engine, tokenizer, gen: GenerationConfig, he: HybridEngineConfig, world_size: int = 1,
                 log: Callable[[str], None] = print):
        self.engine, self.tokenizer, self.gen, self.he, self.log = actor_engine, tokenizer, gen, he, log
        self.zero3 = getattr(actor_engine, "zero_optimization_stage", lambda: 0)() == 3
        self.synced = self.zero3 and world_size > 1  # every rank must keep stepping under ZeRO-3
        self.fast = self._fast_decoder() if he.enabled else None
        self.last_path: str | None = None  # the path the last rollout took
        self._told = False

    def _fast_decoder(self):
        from rlhf_core.engines.decode import FastDecoder, arch_of

        model = unwrap(self.engine)
        arch = arch_of(model.config)
        if arch is None:
            return None
        # A DeepSpeed engine knows its device; under ZeRO-3 offload the parameters themselves may sit on the host.
        device = getattr(self.engine, "device", None) or next(model.parameters()).device
        auto = "bf16" if device.type == "cuda" else "fp32"
        dtype = torch_dtype(auto if self.he.dtype == "auto" else self.he.dtype)
        g = self.gen
        return FastDecoder(arch, device, dtype, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                           do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                           cuda_graphs=self.he.cuda_graphs, bucket=self.he.kv_bucket)

    @property
    def path(self) -> str:
        """The path the last rollout took ("fast" or "transformers"), or the one the next will try."""
        return self.last_path or ("fast" if self.fast is not None else "transformers")

    def _fits(self, B: int, P: int, T: int) -> bool:
        """Whether the fast path's whole weights and KV cache fit the accelerator now. A ZeRO-3 actor too big
        for one device (OPT-66B in bf16 is 132 GB) generates through transformers instead, its layers gathered
        as they run. All ranks take the same path: under ZeRO-3 the two paths' collectives differ."""
        model = unwrap(self.engine)
        need, free = self.fast.bytes_needed(model, B, P, T), self.fast.bytes_available()
        ok = need <= free
        if self.synced and self.fast.device.type == "cuda":
            flag = torch.tensor([int(ok)], device=self.fast.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item())
        if not ok and not self._told:
            weights = self.fast.bytes_needed(model, 0, 0, 0)
            fix = ("the whole weights alone do not fit one device" if weights > free else
                   "a smaller rl.rollout_batch_size or hybrid_engine.max_batch would use the fast path")
            self.log(f"hybrid engine: generating {B} x {T} tokens at once needs about {need / 2**30:.1f} GiB (whole "
                     f"weights and KV cache) and {free / 2**30:.1f} GiB is free here or on another rank; generating with "
                     f"transformers instead ({fix})")
            self._told = True
        return ok

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, timer=None) -> Rollout:
        """Sample answers for left-padded prompts [B, P]; answers are padded to ``max_answer_len``. ``timer``
        (a ``Timer``, optional) times the fast path's phases as ``generate/load``, ``generate/capture``,
        ``generate/prefill``, ``generate/decode`` and ``generate/release``."""
        phase = timer if timer is not None else (lambda name: nullcontext())
        A = max_new_tokens or self.gen.max_answer_len
        sample = self.gen.do_sample if do_sample is None else do_sample
        rows, P = min(prompt_ids.shape[0], self.he.max_batch), prompt_ids.shape[1]  # rows: of the largest chunk
        if self.fast is not None and sample == self.gen.do_sample and self._fits(rows, P, P + A):
            self.last_path = "fast"
            model = unwrap(self.engine)
            with phase("generate/load"):
                self.fast.load(model)  # once per rollout: gathered, LoRA merged, cast
            try:  # chunks share P and A, so their answers concatenate
                parts = [self.fast.generate(ids, mask, A, with_logprobs=True, timer=timer)
                         for ids, mask in zip(prompt_ids.split(rows), prompt_mask.split(rows))]
            finally:
                if self.he.release_memory:
                    with phase("generate/release"):
                        self.fast.release()
            answers, logprobs = (torch.cat(t).to(prompt_ids.device) for t in zip(*parts))
            rollout = self._rollout(torch.cat([prompt_ids, answers], 1), prompt_mask, A)
            return dataclasses.replace(rollout, logprobs=logprobs * rollout.response_mask)
        self.last_path = "transformers"
        return self._hf_generate(prompt_ids, prompt_mask, A, sample)

    def _hf_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, A: int, sample: bool) -> Rollout:
        from transformers import GenerationConfig as HFGenerationConfig

        model = unwrap(self.engine)
        was_training = model.training
        model.eval()
        kwargs = dict(max_new_tokens=A, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, use_cache=True)
        if sample:
            kwargs.update(temperature=self.gen.temperature, top_k=self.gen.top_k or None, top_p=self.gen.top_p)
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 generation_config=HFGenerationConfig(**kwargs), synced_gpus=self.synced)
        finally:
            model.train(was_training)
        return self._rollout(out, prompt_mask, A)

    def _rollout(self, out: torch.Tensor, prompt_mask: torch.Tensor, A: int) -> Rollout:
        P = prompt_mask.shape[1]
        pad = self.tokenizer.pad_token_id
        if out.shape[1] < P + A:  # generate stops when every row has finished
            out = torch.cat([out, out.new_full((out.shape[0], P + A - out.shape[1]), pad)], 1)
        responses = out[:, P:]
        response_mask = response_mask_from(responses, self.tokenizer.eos_token_id)
        sequences = torch.cat([out[:, :P], torch.where(response_mask.bool(), responses, pad)], 1)
        return Rollout(sequences, torch.cat([prompt_mask, response_mask], 1), response_mask, P)
