"""The training draws: a weighted mix of sources that a checkpoint can resume exactly, mid-epoch, and that a
curriculum stage can restrict to some records (``ReasoningDataModule`` builds both)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from vold_pl.errors import UserError


class MixedSampler(Sampler[int]):
    """Indices into a ``ConcatDataset`` drawn by source weight, reproducible from ``(seed, epoch)``.

    Each source is walked in its own shuffled order (reshuffled when exhausted), so a small source
    repeats only after every item was seen. Under DDP/FSDP each rank takes every ``world_size``-th draw.
    ``start`` skips draws already consumed, which is how a resumed run continues mid-epoch.
    ``pools`` (set by :meth:`set_pools`, e.g. for a curriculum stage) restricts each source to some of its
    records; a source with an empty pool drops out of the mix and the other weights are renormalised.
    """

    def __init__(self, sizes: list[int], weights: list[float], num_samples: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(sizes) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"source weights must be non-negative with a positive sum, got {weights}")
        self.sizes, self.weights, self.num_samples, self.seed = sizes, weights, num_samples, seed
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0
        self.pools: list[list[int]] | None = None  # per source: local indices it may draw; None = all
        self.offsets = [0]
        for s in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + s)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_pools(self, pools: list[list[int]] | None, num_samples: int) -> None:
        """Draw only ``pools[s]`` (local indices) of each source ``s`` (``None``: every record), ``num_samples``
        per rank; takes effect at the next ``iter``."""
        if pools is not None:
            if len(pools) != len(self.sizes) or any(i < 0 or i >= n for p, n in zip(pools, self.sizes) for i in p):
                raise ValueError(f"pools must hold local indices of each of the {len(self.sizes)} sources")
            if not any(w > 0 and p for w, p in zip(self.weights, pools)):
                raise UserError(f"every eligible record is in a source of weight 0 (weights {self.weights}, eligible "
                                 f"per source {[len(p) for p in pools]}): nothing can be drawn.")
        self.pools, self.num_samples = pools, num_samples

    def _draws(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.num_samples * self.world_size
        pools = self.pools if self.pools is not None else [range(n) for n in self.sizes]
        weights = [w if len(p) else 0.0 for w, p in zip(self.weights, pools)]  # empty pools drop out
        choice = torch.multinomial(torch.tensor(weights, dtype=torch.double), total, replacement=True, generator=g)
        orders = [torch.randperm(len(p), generator=g).tolist() for p in pools]
        pos = [0] * len(pools)
        out = []
        for s in choice.tolist():
            if pos[s] == len(pools[s]):
                orders[s], pos[s] = torch.randperm(len(pools[s]), generator=g).tolist(), 0
            out.append(self.offsets[s] + pools[s][orders[s][pos[s]]])
            pos[s] += 1
        return out

    def __iter__(self) -> Iterator[int]:
        mine = self._draws()[self.rank :: self.world_size]
        start, self.start = self.start, 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ResumableDataLoader(DataLoader):
    """The training loader: counts the batches it yields, so a checkpoint records where the epoch stands.

    Lightning saves ``state_dict()`` with every checkpoint (the loader is "stateful") and calls
    ``load_state_dict`` when it resumes; the next epoch iterator then skips the draws of the batches already
    trained on (``MixedSampler.start``), so a resumed run sees exactly the batches the uninterrupted run saw.
    The skip is decided when iteration starts (after Lightning has set the sampler's epoch): a checkpoint
    written after the last batch of an epoch resumes with the next epoch, in full.

    With a curriculum, each epoch draws from the records its stage selects: ``stage_filter()`` gives the current
    filter and ``plan(filter)`` the sampler's pools and size. The filter is read when an epoch's iterator is
    created (:meth:`prepare_epoch`), so a stage change takes effect at the next epoch, and it is saved with the
    position: a resumed epoch draws with the filter it started with.
    """

    def __init__(self, *args, stage_filter: Callable[[], dict | None] | None = None,
                 plan: Callable[[dict | None], tuple[list[list[int]] | None, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._yielded = 0, 0
        self._pending: dict | None = None
        self._stage_filter, self._plan = stage_filter, plan
        self._filter: dict | None = None

    def prepare_epoch(self) -> int:
        """Point the sampler at the coming epoch's records (the resumed epoch's filter, else the current one);
        returns the epoch's length in batches."""
        p = self._pending
        resumed = p is not None and p["epoch"] == self.sampler.epoch and "filter" in p
        self._filter = p["filter"] if resumed else (self._stage_filter() if self._stage_filter else None)
        if self._plan is not None:
            self.sampler.set_pools(*self._plan(self._filter))
        return len(self)

    def __iter__(self):
        self.prepare_epoch()  # now, so the length Lightning reads right after is this epoch's
        return self._counting()

    def _counting(self):
        sampler = self.sampler
        self.prepare_epoch()  # again: Lightning may set the sampler's epoch between iter() and the first batch
        skip = 0
        if self._pending is not None:
            if self._pending["epoch"] == sampler.epoch and self._pending["sampler_size"] == sampler.num_samples:
                skip = self._pending["batches"]
            self._pending = None
        sampler.start = skip * self.batch_size
        self._epoch, self._yielded = sampler.epoch, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._yielded, "batch_size": self.batch_size,
                "sampler_size": self.sampler.num_samples, "world_size": self.sampler.world_size,
                "filter": self._filter}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size") != self.batch_size or state.get("world_size") != self.sampler.world_size:
            print(f"[vold-pl] the checkpoint's data position was taken with batch_size={state.get('batch_size')} on "
                  f"{state.get('world_size')} process(es), this run has batch_size={self.batch_size} on "
                  f"{self.sampler.world_size}: the epoch restarts from its first batch.")
            return
        self._pending = dict(state)
