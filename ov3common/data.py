"""Data order with exact resume: map-style sampling and streaming over shards.

* :class:`ResumableSampler` (map-style: LLaVA records, RAE's ImageNet files and latent caches): the order of an
  epoch is a pure function of (seed, epoch); a resumed run continues where it stopped.
* :class:`ShardStreams` (streaming: the encoder's image-text shards, any number of samples): no global index and
  no global permutation. The epoch's shards are dealt from a seeded shard permutation to ``streams`` logical
  streams (default: one per (rank, DataLoader worker)); each stream reads its shards sequentially through a
  shuffle buffer. A step's global batch takes the same number of samples from every stream, so the order is a
  pure function of (seed, epoch, streams), whatever the processes and workers that host the streams.
  In ``resampled`` mode shards are drawn with replacement (open_clip's ``--dataset-resampled``) and the stream
  never ends.

Resume state, per stream: epoch, shard cursor, samples read in the current shard, the buffer RNG's state and
the buffer's content as (cursor, index-in-shard) references: it grows with the buffer size, not with the data.
On resume the buffered samples are re-read from their shards and the current shard is skipped to its offset
without reading (local file) or keeping (stream) the bytes of the samples before it; nothing is decoded.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from ov3common.log import get_logger
from ov3common.shards import TarSample, iter_tar

__all__ = ["ResumableSampler", "StreamSpec", "SampleStream", "ShardStreams", "StreamLoader", "lockstep"]


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


# ------------------------------------------------------------------------------------------------ streaming
@dataclass(frozen=True)
class StreamSpec:
    """What a set of logical streams reads: ``urls`` (shards), dealt to ``streams`` streams per epoch."""

    urls: tuple[str, ...]
    streams: int
    seed: int = 0
    shuffle_shards: bool = True
    buffer: int = 1000  # shuffle-buffer slots per stream; <= 1: no sample shuffle
    resampled: bool = False

    def __post_init__(self):
        if not self.urls:
            raise ValueError("StreamSpec: no shards")
        if self.streams < 1:
            raise ValueError(f"StreamSpec: streams must be >= 1, got {self.streams}")
        if not self.resampled and len(self.urls) < self.streams:
            raise ValueError(f"{len(self.urls)} shards for {self.streams} streams (ranks x workers): every stream "
                             f"needs a shard of its own; give more shards, fewer streams, or use resampled mode")

    def shards(self, epoch: int, stream: int) -> list[int]:
        """Non-resampled: this stream's shard indices for ``epoch`` (a seeded permutation, dealt round-robin)."""
        n = len(self.urls)
        perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(n) if self.shuffle_shards \
            else np.arange(n)
        return perm[stream :: self.streams].tolist()

    def draw(self, epoch: int, stream: int, cursor: int) -> int:
        """Resampled: the shard index of draw ``cursor`` (with replacement; a pure function, so resume is O(1))."""
        return int(np.random.default_rng([self.seed, epoch, stream, cursor, 0x5253]).integers(len(self.urls)))


class RawSample(NamedTuple):
    """A shard sample (undecoded) and the cursor of the shard it came from (with its index: a buffer reference)."""

    sample: TarSample
    cursor: int


class SampleStream:
    """One logical stream of raw (undecoded) samples; :meth:`state` after any sample resumes right after it."""

    def __init__(self, spec: StreamSpec, stream: int, epoch: int, state: dict | None = None,
                 on_error: Callable[[str, str, str], None] | None = None):
        self.spec, self.stream, self.epoch, self.on_error = spec, stream, epoch, on_error
        self.cursor, self.offset = 0, 0
        self.rng = np.random.Generator(np.random.PCG64([spec.seed, epoch, stream, 0x4255]))
        self._refs: list[list[int]] = []
        if state is not None:
            if int(state["epoch"]) != epoch:
                raise ValueError(f"stream {stream}: state is for epoch {state['epoch']}, not {epoch}")
            self.cursor, self.offset = int(state["cursor"]), int(state["offset"])
            self.rng.bit_generator.state = state["rng"]
            self._refs = [list(map(int, r)) for r in np.asarray(state["buffer"]).reshape(-1, 2).tolist()]
        self.buf: list[RawSample] = []

    def _url(self, cursor: int) -> str | None:
        if self.spec.resampled:
            return self.spec.urls[self.spec.draw(self.epoch, self.stream, cursor)]
        shards = self._shards
        return self.spec.urls[shards[cursor]] if cursor < len(shards) else None

    def state(self) -> dict:
        refs = np.array([[b.cursor, b.sample.index] for b in self.buf], dtype=np.int64).reshape(-1, 2)
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "rng": self.rng.bit_generator.state, "buffer": refs}

    def _rebuild(self) -> None:
        """Re-read the buffered samples of a saved state (their shards before the current one are read as far as
        the last one needed; the current shard's are picked up on the way to ``offset``)."""
        want: dict[int, set[int]] = {}
        for c, i in self._refs:
            want.setdefault(c, set()).add(i)
        found: dict[tuple[int, int], RawSample] = {}
        for c in sorted(want):
            if c >= self.cursor:
                continue
            idx = want[c]
            for s in iter_tar(self._url(c), select=idx.__contains__, stop=max(idx) + 1, on_error=self.on_error):
                found[(c, s.index)] = RawSample(s, c)
        self._found = found

    def __iter__(self) -> Iterator[RawSample]:
        if not self.spec.resampled:
            self._shards = self.spec.shards(self.epoch, self.stream)
        size = self.spec.buffer
        self._found = {}
        if self._refs:
            self._rebuild()
        pending = {(c, i) for c, i in self._refs}
        while True:
            url = self._url(self.cursor)
            if url is None:
                break
            c, start = self.cursor, self.offset
            here = {i for cc, i in pending if cc == c}
            for s in iter_tar(url, select=lambda i, h=here, s0=start: i >= s0 or i in h, on_error=self.on_error):
                if s.index < start:  # a buffered sample of a resumed state, picked up on the way
                    self._found[(c, s.index)] = RawSample(s, c)
                    continue
                if pending:  # the resumed buffer is complete once the current shard reaches its offset
                    self._restore_buffer(pending)
                    pending = set()
                self.offset = s.index + 1
                if size <= 1:
                    yield RawSample(s, c)
                    continue
                if len(self.buf) < size:
                    self.buf.append(RawSample(s, c))
                    continue
                j = int(self.rng.integers(size))
                out, self.buf[j] = self.buf[j], RawSample(s, c)
                yield out
            if pending:
                self._restore_buffer(pending)
                pending = set()
            self.cursor, self.offset = self.cursor + 1, 0
        if pending:
            self._restore_buffer(pending)
        while self.buf:  # end of the epoch's shards: drain the buffer in random order
            j = int(self.rng.integers(len(self.buf)))
            self.buf[j], self.buf[-1] = self.buf[-1], self.buf[j]
            yield self.buf.pop()

    def _restore_buffer(self, pending: set) -> None:
        missing = [r for r in self._refs if tuple(r) not in self._found]
        if missing and self.on_error is not None:
            self.on_error("resume_missing", f"stream {self.stream}", f"{len(missing)} buffered samples not found "
                          f"again (a shard changed or became unreadable since the checkpoint)")
        self.buf = [self._found[tuple(r)] for r in self._refs if tuple(r) in self._found]
        self._found, self._refs = {}, []


class ShardStreams(IterableDataset):
    """Chunks of decoded samples, in lockstep over the logical streams hosted by this process / worker.

    Rank ``r`` of ``world`` hosts streams ``[r*S/world, (r+1)*S/world)``; DataLoader worker ``w`` of ``W`` hosts a
    contiguous block of those. Every item is one chunk: ``per_stream`` raw samples from each hosted stream, in
    stream order, decoded by ``decode(sample, epoch, cursor)`` and collated by ``collate(items)``; the chunk carries
    ``_stream = {"worker", "t", "state": {stream: state}}`` (the states after the chunk) and ``_errors`` (shard
    problems counted by reason since the previous chunk). A worker stops at the first stream that cannot fill
    its share of a chunk (the end of the epoch)."""

    def __init__(self, spec: StreamSpec, rank: int, world: int, per_stream: int, decode: Callable,
                 collate: Callable, epoch: int = 0, state: dict | None = None):
        if spec.streams % world:
            raise ValueError(f"{spec.streams} streams do not split over {world} ranks")
        self.spec, self.rank, self.world, self.per_stream = spec, rank, world, per_stream
        self.decode, self.collate, self.epoch = decode, collate, epoch
        self.state = state or {}

    def rank_streams(self) -> list[int]:
        k = self.spec.streams // self.world
        return list(range(self.rank * k, (self.rank + 1) * k))

    def hosted(self, worker: int, workers: int) -> list[int]:
        mine = self.rank_streams()
        if len(mine) % workers:
            raise ValueError(f"{len(mine)} streams on this rank do not split over {workers} DataLoader workers "
                             f"(set data.streams to a multiple of world size x data.num_workers)")
        k = len(mine) // workers
        return mine[worker * k : (worker + 1) * k]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        errors: dict[str, int] = {}

        def on_error(reason: str, url: str, detail: str) -> None:
            errors[reason] = errors.get(reason, 0) + 1
            get_logger("ov3common.data").warning("%s: %s (%s)", url, reason, detail)

        streams = [SampleStream(self.spec, s, self.epoch, self.state.get(s), on_error)
                   for s in self.hosted(worker, workers)]
        its = [iter(s) for s in streams]
        t = 0
        while True:
            items = []
            for it in its:
                for _ in range(self.per_stream):
                    raw = next(it, None)
                    if raw is None:
                        return
                    items.append(self.decode(raw.sample, self.epoch, raw.cursor))
            chunk = self.collate(items)
            chunk["_stream"] = {"worker": worker, "t": t, "state": {st.stream: st.state() for st in streams}}
            chunk["_errors"], errors = dict(errors), {}
            t += 1
            yield chunk


class StreamLoader:
    """One rank's step batches from :class:`ShardStreams` through a DataLoader: ``W`` workers each yield a chunk per
    step, merged in worker order by ``merge(chunks)``. Tracks the resume state of every stream of the rank
    (:attr:`state`, after the last batch handed out)."""

    def __init__(self, dataset: ShardStreams, num_workers: int, merge: Callable, pin_memory: bool = False,
                 worker_start: str = "forkserver", timeout: float = 0):
        self.ds, self.workers, self.merge, self.pin_memory = dataset, num_workers, merge, pin_memory
        self.worker_start, self.timeout = worker_start, timeout
        self.state: dict[int, dict] = dict(dataset.state)

    def _context(self):
        """The workers' start method. ``forkserver`` (default): workers fork from a single-threaded server that has
        imported the dataset's modules, not from this process, whose collective-backend threads (gloo, NCCL) may
        hold locks at the fork (a worker deadlocked that way never returns a chunk). ``fork``: faster first batch."""
        if not self.workers:
            return None
        ctx = mp.get_context(self.worker_start)
        if self.worker_start == "forkserver":
            mods = {__name__} | {getattr(f, "__module__", None) for f in (self.ds.decode, self.ds.collate)}
            ctx.set_forkserver_preload(sorted(m for m in mods if m and m != "__main__"))
        return ctx

    def __iter__(self):
        w = max(self.workers, 1)
        loader = DataLoader(self.ds, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            persistent_workers=False, multiprocessing_context=self._context(),
                            timeout=self.timeout if self.workers else 0)
        it = iter(loader)
        t = 0
        while True:
            group = []
            for i in range(w):
                chunk = next(it, None)
                if chunk is None or chunk["_stream"]["worker"] != i or chunk["_stream"]["t"] != t:
                    return  # a worker ran out: the epoch ends for the whole rank (no half-filled step)
                group.append(chunk)
            errors: dict[str, int] = {}
            for c in group:
                self.state.update(c["_stream"].pop("state"))
                for k, v in c.pop("_errors").items():
                    errors[k] = errors.get(k, 0) + v
                c.pop("_stream")
            batch = self.merge(group)
            batch["shard_errors"] = errors
            t += 1
            yield batch


def lockstep(iterable, device: torch.device | str = "cpu"):
    """Yield while every rank has an item (one tiny all-reduce per step under torchrun): ranks end an epoch
    together even when their streams hold different numbers of samples."""

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for item in iterable:
        if multi:
            flag = torch.ones(1, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() < 1:
                return
        yield item
    if multi:
        flag = torch.zeros(1, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
