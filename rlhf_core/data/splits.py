"""Which rows go to which step, and how a step's rows are blended across sources: index arithmetic only.

Rows are named by their index in a source's file (``0..n-1``, every row of the file, valid or not); the data
stage (``prepare.py``) maps them to the rows it spilled.

**Split schemes** (``data.split_scheme``), per source:

- ``default``: the source's valid rows in a seeded shuffle (Python's ``random.Random``, seeded from
  ``sha256(seed/source/...)``); ``max_rows`` keeps the first rows of it; a source without an eval split gives
  the first ``max(1, round(n * eval_fraction))`` of them to eval; train and eval are each cut into consecutive
  parts at rounded cumulative boundaries ``round(n * (s_1 + ... + s_k) / total)``.
- ``deepspeed_chat``: DeepSpeed-Chat's ``data_utils``: for each split, a NumPy ``RandomState(seed)``
  permutation of all its rows (valid or not), cut at boundaries that add up each share's own
  ``int(round(share / total * n))`` and are then all moved by the difference to ``n`` (the first step absorbs
  the rounding); a source without an eval split is first cut ``9,1`` (``1 - eval_fraction, eval_fraction``)
  the same way; ``max_rows`` keeps the file's first rows. Rows a step cannot use (no rejected answer for the
  reward model, a prompt too long for rl, an invalid row) are then removed in place, as DeepSpeed-Chat does.

For the same seed, split and rows, the two put different rows in each step (overlap at chance), and for small
``n`` the share sizes can differ by one (``n = 7``, ``1,1,1``: default 2/3/2, deepspeed_chat 3/2/2).

**Blends**, per step and split:

- ``default``: source i contributes ``t_i`` rows, ``t = T * w_i / sum(w)`` rounded by largest remainder, with
  ``w_i`` its weight (unset: its row count) and ``T`` the step's ``blend_total`` (unset: the sum of the rows):
  ``t_i // n_i`` full passes over its rows and then its first ``t_i % n_i`` rows (its rows are already in a
  seeded shuffle, so that is a random subset). Without weights or a total every row is used once. The blend is
  then shuffled (seeded), unless it is one source's rows once. Eval sets always keep every row once.
- ``deepspeed_chat``: the sources' rows concatenated in config order and, with more than one source, permuted
  by ``RandomState(seed)``; for sft, the sources with ``stages: [sft]`` (DeepSpeed-Chat's
  ``--sft_only_data_path``) are then appended and the whole permuted again.
"""

from __future__ import annotations

import array
import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np


def seeded_rng(seed: int, *salt: str) -> random.Random:
    """The default scheme's generator for one purpose (``salt``) under one seed."""
    digest = hashlib.sha256("/".join((str(seed),) + salt).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def shuffled(ids: np.ndarray, rng: random.Random) -> np.ndarray:
    """``ids`` in the order ``rng.shuffle`` gives a list of that length (8 bytes a row, not a Python list)."""
    buf = array.array("q", ids.astype(np.int64, copy=False).tobytes())
    rng.shuffle(buf)  # shuffle reads only the length and swaps items: the same permutation as for a list
    return np.frombuffer(buf, dtype=np.int64).copy()


def cut_default(ids: np.ndarray, shares: Sequence[float]) -> list[np.ndarray]:
    """Consecutive parts of ``ids`` proportional to ``shares``, boundaries at rounded cumulative sums."""
    total, n, acc, bounds = sum(shares), len(ids), 0, [0]
    for s in shares:
        acc += s
        bounds.append(round(n * acc / total))
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def deepspeed_chat_permutation(seed: int, size: int) -> np.ndarray:
    """DeepSpeed-Chat's shuffle index: ``arange(size)`` (uint32 below 2**32 - 1) shuffled by ``RandomState(seed)``."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    idx = np.arange(size, dtype=dtype)
    np.random.RandomState(seed=seed).shuffle(idx)
    return idx.astype(np.int64)


def deepspeed_chat_bounds(size: int, shares: Sequence[float]) -> list[int]:
    """Boundaries of DeepSpeed-Chat's split: each share rounded on its own, then all shifted to end at ``size``."""
    floats = [float(s) for s in shares]
    total = sum(floats)
    bounds = [0]
    for s in floats:
        bounds.append(bounds[-1] + int(round(s / total * float(size))))
    diff = bounds[-1] - size
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def cut_deepspeed_chat(size: int, shares: Sequence[float], seed: int) -> list[np.ndarray]:
    """Row indices ``0..size-1`` of each share, in DeepSpeed-Chat's order."""
    perm = deepspeed_chat_permutation(seed, size)
    bounds = deepspeed_chat_bounds(size, shares)
    return [perm[a:b] for a, b in zip(bounds, bounds[1:])]


# ------------------------------------------------------------------------------------------------ blends


@dataclass(frozen=True)
class BlendUse:
    """What one source's rows became in one blended set."""

    rows: int  # rows the source offered
    used: int  # distinct rows in the blend
    oversampled: int  # rows in the blend beyond one pass
    dropped: int  # rows left out


def blend_targets(sizes: Sequence[int], weights: Sequence[float] | None, total: int | None) -> list[int]:
    """Rows each source contributes: ``total`` (default: the sum of ``sizes``) in proportion to the weights
    (default: the sizes), rounded by largest remainder (ties to the earlier source) so they sum to the total.
    A source with no rows contributes none."""
    present = [i for i, n in enumerate(sizes) if n > 0]
    if not present:
        return [0] * len(sizes)
    w = [Fraction(weights[i]) if weights is not None else Fraction(sizes[i]) for i in present]
    T = sum(sizes) if total is None else total
    exact = [T * wi / sum(w) for wi in w]
    floors = [int(x) for x in exact]
    for k in sorted(range(len(present)), key=lambda k: (-(exact[k] - floors[k]), k))[: T - sum(floors)]:
        floors[k] += 1
    out = [0] * len(sizes)
    for i, t in zip(present, floors):
        out[i] = t
    return out


def blend_default(parts: Sequence[np.ndarray], weights: Sequence[float] | None, total: int | None,
                  rng: random.Random) -> tuple[np.ndarray, list[BlendUse]]:
    """The default scheme's blend of several sources' rows (see the module docstring)."""
    sizes = [len(p) for p in parts]
    targets = blend_targets(sizes, weights, total)
    pieces, uses = [], []
    for part, n, t in zip(parts, sizes, targets):
        if n:
            reps, rest = divmod(t, n)
            pieces += [part] * reps + [part[:rest]]
        uses.append(BlendUse(rows=n, used=min(n, t), oversampled=max(0, t - n), dropped=max(0, n - t)))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    once_one_source = sum(1 for t in targets if t) <= 1 and all(t <= n for t, n in zip(targets, sizes))
    return (ids if once_one_source else shuffled(ids, rng)), uses


def blend_deepspeed_chat(main: Sequence[np.ndarray], sft_only: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """DeepSpeed-Chat's blend: ``main`` concatenated (permuted when there are several), then ``sft_only``
    appended and the whole permuted (pass ``sft_only`` only for the sft step)."""
    def permute(ids: np.ndarray) -> np.ndarray:
        return ids[deepspeed_chat_permutation(seed, len(ids))]

    ids = np.concatenate(list(main)) if main else np.zeros(0, dtype=np.int64)
    if len(main) > 1:
        ids = permute(ids)
    if sft_only:
        ids = permute(np.concatenate([ids, *sft_only]))
    return ids
