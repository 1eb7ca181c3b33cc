"""Distributed, deterministic, iteration-based sampler.

The training stream is infinite. Global position p (0, 1, 2, ...) lies in pass q = p // N over the
N records, at offset p % N of that pass's permutation, a fresh `randperm(N)` seeded with seed + q.
The stream is cut into global batches of W * B positions (W ranks, B samples per device); rank r
takes positions [s*W*B + r*B, s*W*B + (r+1)*B) of global batch s, so the ranks' slices are disjoint
and together cover every global batch. Each position yields the key (index, draw=p): the dataset
seeds all of that sample's randomness from (seed, draw), so a run resumed at `samples_seen`
continues exactly, with no replay and no RNG state to carry. (Global batches start at `start`; a
resume with another world size, where samples_seen is not a multiple of the new W * B, still
neither replays nor skips a position.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class IterationSampler(Sampler[tuple[int, int]]):
    """Infinite stream of `(index, draw)` keys for one rank; a DataLoader with batch_size=B batches them."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start: int = 0):  # fmt: skip
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch {batch_size}, rank {rank} of {world_size}")
        self.n, self.batch, self.rank, self.world, self.seed, self.start = (
            num_samples, batch_size, rank, world_size, seed, start
        )  # fmt: skip
        self._pass, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def permutation(self, q: int) -> torch.Tensor:
        """Record order of pass `q` (cached: one pass is held at a time)."""
        if q != self._pass:
            g = torch.Generator().manual_seed(self.seed + q)
            self._pass, self._perm = q, torch.randperm(self.n, generator=g)
        return self._perm

    def key(self, p: int) -> tuple[int, int]:
        """(index, draw) at global position `p`."""
        return int(self.permutation(p // self.n)[p % self.n]), p

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self.start + self.rank * self.batch
        while True:
            for p in range(first, first + self.batch):
                yield self.key(p)
            first += self.batch * self.world
