"""The deterministic batch schedule every training stage (and the pretraining mixture) draws from."""

from __future__ import annotations

import torch


def epoch_batches(n_rows: int, micro: int, world: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of one epoch for every rank: ``[step][rank] -> row indices``.

    One seeded permutation, cut into global batches of ``micro * world`` rows; rank r takes the r-th slice;
    the ragged tail is dropped. Every rank can see every rank's rows (to count tokens for exact loss
    normalisation) and a restart knows exactly where it was.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    per_step = micro * world
    return [
        [perm[s * per_step + r * micro: s * per_step + (r + 1) * micro] for r in range(world)]
        for s in range(n_rows // per_step)
    ]
