"""Fast generation for step 3: a static-shape decoder over the actor's full weights.

Generation is memory-bandwidth bound: every new token reads all weights and the KV cache. So, per rollout:

* the full weights are read out of the training module once (under ZeRO-3 gathered one layer at a time,
  once per rollout, not per layer per token), LoRA merged, cast to the generation dtype (bf16 on GPUs), and
  copied *in place* into buffers that persist across rollouts;
* prompts are run through once (prefill) into a static KV cache sized to the batch;
* each decode step is one replay of a CUDA graph (no per-kernel launch cost, no host sync). A graph fixes
  its tensors' shapes and addresses, hence static shapes and in-place buffers; and one graph per KV-length
  bucket (``bucket`` positions each), so that attention reads only the part of the cache in use rather
  than all of it at every step. Sampling (temperature, top-k, top-p via the Gumbel-max trick) runs inside
  the graph;
* finished sequences keep their slot (static shapes) but emit pad; the host looks at "all finished" only
  every ``check_every`` steps.

Design: one generic decoder (``generic.FastDecoder``: prefill, decode step, graphs, sampling; every tensor
it holds in one ``generic.DecodeBuffers``) and one small object per model family (``base.Family``: reading
the layout from a transformers config, loading weights, embeddings, norms, q/k/v, MLP). The families are
OPT (pre- and post-LayerNorm, with projections, as in OPT-350M; ``opt.py``) and Llama (RoPE,
grouped-query attention, SwiGLU; ``llama.py``). A new family is a new file implementing ``base.Family``
plus one line in ``FAMILIES``. ``arch_of`` returns None for anything else and the caller falls back to
transformers ``generate``. On CPU the same code runs eagerly, without graphs.
"""

from __future__ import annotations

from .base import Arch, Family, Weights
from .generic import DecodeBuffers, FastDecoder
from .llama import Llama
from .opt import OPT

FAMILIES: dict[str, type[Family]] = {"opt": OPT, "llama": Llama}  # transformers model_type -> family


def arch_of(config) -> Arch | None:
    """The decoder layout of a transformers config, or None when no family here implements it."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    return family.arch_of(config) if family is not None else None


__all__ = ["FAMILIES", "Arch", "DecodeBuffers", "Family", "FastDecoder", "Weights", "arch_of"]
