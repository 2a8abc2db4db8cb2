"""The pretraining corpus for the mixture loss (InstructGPT's "PPO-ptx"; also usable during SFT).

The corpus is cut into fixed-size token blocks (documents joined by EOS). Which blocks a draw uses is a
pure function of the draw's index, so resuming needs no extra state: the index follows from the update
counter, which every checkpoint holds.
"""

from __future__ import annotations

import torch

from rlhf_core.data.batches import epoch_batches
from rlhf_core.data.prepare import load_split
from rlhf_core.storage.store import Manifest, Store


def load_blocks(store: Store, data: Manifest, tokenizer, block_tokens: int, max_blocks: int | None,
                split: str = "train") -> torch.Tensor:
    """[N, block_tokens] token ids of the stored corpus split."""
    ds = load_split(store, data, f"ptx/{split}")
    ids = tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    blocks = torch.tensor(stream[: len(stream) // block_tokens * block_tokens], dtype=torch.long).view(-1, block_tokens)
    if max_blocks:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError(f"the pretraining corpus has fewer than {block_tokens} tokens; lower data.ptx.block_tokens")
    return blocks


class PtxSchedule:
    """Batches of blocks in a seeded order per pass over the corpus; ``batch(i)`` is the i-th draw."""

    def __init__(self, blocks: torch.Tensor, batch: int, rank: int, world: int, seed: int):
        if len(blocks) < batch * world:
            raise ValueError(f"{len(blocks)} pretraining blocks are fewer than one batch of {batch} x {world} processes")
        self.blocks, self.batch_size, self.rank, self.world, self.seed = blocks, batch, rank, world, seed
        self.per_epoch = len(blocks) // (batch * world)
        self._epoch, self._schedule = -1, []

    def batch(self, index: int) -> torch.Tensor:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._schedule = epoch, epoch_batches(len(self.blocks), self.batch_size, self.world, self.seed, epoch)
        return self.blocks[self._schedule[pos][self.rank]]
