"""Resumable, rank-sharded sampling: the order of an epoch is a pure function of (seed, epoch), so a resumed run
continues exactly where it stopped — no sample seen twice or skipped within the epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Like DistributedSampler, plus a start offset: ``set_epoch(epoch, start)`` skips the ``start`` samples this rank
    already consumed in ``epoch``. The training loop counts consumed samples and checkpoints them."""

    def __init__(self, length: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if length <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        if self.drop_last:
            return self.length // self.world_size
        return -(-self.length // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start={start} outside [0, {self.per_rank}] for epoch {epoch}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (before the start offset)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            idx = torch.randperm(self.length, generator=g).tolist()
        else:
            idx = list(range(self.length))
        total = self.per_rank * self.world_size
        if total > len(idx):
            idx = idx + idx[: total - len(idx)]
        return idx[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "length": self.length}

    def load_state_dict(self, d: dict) -> None:
        if d.get("length", self.length) != self.length or d.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state is for length={d.get('length')} seed={d.get('seed')}, "
                             f"this run has length={self.length} seed={self.seed}")
        self.set_epoch(int(d["epoch"]), int(d["start"]))
