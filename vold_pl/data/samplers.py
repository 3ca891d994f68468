"""Evaluation samplers under data parallelism: every rank gets the same number of items."""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = ["EvenShardSampler", "uses_distributed_sampler"]


def uses_distributed_sampler(trainer) -> bool:
    """Whether Lightning will wrap the data loaders' samplers in a ``DistributedSampler`` (the Trainer's
    ``use_distributed_sampler``). Lightning 2.6 keeps that constructor argument only on its private accelerator
    connector and has no public accessor; this is the one place that reads it (see docs/architecture.md)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", False))


class EvenShardSampler(torch.utils.data.Sampler[int]):
    """Sequential evaluation indices split across ranks, padded so every rank gets the same count.

    Rank ``r`` takes items ``r, r + W, r + 2W, ...``; when ``len(dataset)`` is not a multiple of ``W`` the
    short ranks repeat their first item(s), so every rank runs the same number of batches and no rank waits
    in a collective (``generate`` under FSDP2, ``sync_dist`` logging) for a batch another rank never has.
    The few repeated items are counted twice in rank-averaged metrics, as with ``DistributedSampler``.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.per_rank = math.ceil(n / world_size) if n else 0

    def __iter__(self) -> Iterator[int]:
        mine = list(range(self.rank, self.n, self.world_size))
        while mine and len(mine) < self.per_rank:
            mine.append(mine[len(mine) % max(1, len(mine))])
        if not mine and self.per_rank:  # more ranks than items
            mine = [self.rank % self.n] * self.per_rank
        return iter(mine)

    def __len__(self) -> int:
        return self.per_rank
