"""The skeleton of every hand-written training loop (the encoder, its decoder-only stage, RAE): the step and epoch
position, resume from the newest good checkpoint, periodic saves (the last ``keep_last`` kept), the NaN/Inf guard,
progress with ETA, ``metrics.jsonl`` (+ TensorBoard) and the per-epoch bad-sample counts. A trainer keeps its
config, its step function and its checkpoint layout::

    loop = Loop(out_dir, total_steps, "rae", seed=cfg.seed, rank=info.rank, log_every=10, ckpt_every=100)
    loop.resume(restore)                       # restore(state, rank_state): the trainer's objects + loop.load_state_dict
    for batch in loop.batches(open_data):      # open_data(new_epoch) -> iterable at (loop.epoch, loop.consumed)
        loss = ...                             # torch is already seeded from (seed, loop.step, rank)
        if not loop.guard.bad(loss, loop.step):
            opt.step()
        loop.advance(drawn=len(batch))         # the step is done: loop.step += 1
        loop.report(n_samples, {"loss": ...} if loop.due(loop.log_every) else None)
        if loop.save_due():
            loop.save({"model": ..., "train": loop.state_dict()})
    loop.close()

Exact resume rests on three things the loop does for every trainer: each step reseeds torch from (seed, step, rank),
the checkpoint holds the epoch position (``epoch`` and ``consumed``, or the trainer's own stream state) and every
rank's RNG, and the rows a killed attempt logged past the checkpoint are removed from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ov3common.checkpoint import CheckpointManager, atomic_write_text, capture_rng, restore_rng
from ov3common.dist import step_seed
from ov3common.guard import NonFiniteGuard
from ov3common.heap import heap_reuse
from ov3common.images import SkipStats
from ov3common.log import MetricLogger, TrainProgress, get_logger, read_jsonl

__all__ = ["Loop", "truncate_jsonl"]


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep only the rows of a JSONL log with ``step <= step`` (after a resume from ``step``: the rows a killed
    attempt wrote past its checkpoint go; ``step=-1`` empties it). A missing file is left missing."""
    path = Path(path)
    if path.is_file():
        rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class Loop:
    """The state and the chores of one training run; see the module docstring for the shape of a loop.

    State (all of it in :meth:`state_dict`): ``step`` (steps done), ``epoch``, ``consumed`` (samples this rank drew
    in the epoch, for a map-style sampler's resume), ``guard`` (:class:`~ov3common.guard.NonFiniteGuard`: the
    non-finite streak and total) and ``skips`` (:class:`~ov3common.images.SkipStats`: this epoch's bad samples on
    this rank, reset at every epoch's end).

    Policies: a checkpoint every ``ckpt_every`` steps and at the last step, never right after a skipped
    (non-finite) step unless ``save_after_bad`` (then the latest checkpoint is always a good one);
    ``max_bad_steps`` consecutive non-finite steps raise :class:`~ov3common.guard.TrainingDiverged`;
    ``skip_rows``: each epoch's bad-sample counts also go to ``metrics.jsonl`` (always to the log);
    ``inject_nan_steps`` (tests): the (1-based) steps whose loss the trainer poisons (:meth:`poisoned`)."""

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, desc: str, *, seed: int = 0, rank: int = 0,
                 log_every: int = 10, ckpt_every: int = 100, keep_last: int = 2, max_bad_steps: int = 5,
                 save_after_bad: bool = False, skip_rows: bool = False, inject_nan_steps: Iterable[int] = (),
                 tensorboard: bool = False, logger: logging.Logger | None = None, heap_reuse: bool = False):
        self.out = Path(out_dir)
        self.heap_reuse = heap_reuse  # CPU runs: batches() runs under ov3common.heap.heap_reuse
        self.total, self.desc, self.seed, self.rank = int(total_steps), desc, seed, rank
        self.log_every, self.ckpt_every = max(1, int(log_every)), int(ckpt_every)  # ckpt_every <= 0: the last step only
        self.save_after_bad, self.skip_rows = save_after_bad, skip_rows
        self.inject_nan_steps = set(inject_nan_steps)
        self.log = logger or get_logger(f"{desc}.loop")
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.guard = NonFiniteGuard(max_bad_steps)
        self.skips = SkipStats()
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep_last)
        self.metrics = MetricLogger(self.out, tensorboard=tensorboard)
        self.bar: TrainProgress | None = None

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "guard": self.guard.state_dict(),
                "skips": self.skips.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.consumed = int(d["step"]), int(d["epoch"]), int(d.get("consumed", 0))
        if "guard" in d:
            self.guard.load_state_dict(d["guard"])
        self.skips.load_state_dict(d.get("skips", {}))

    def resume(self, restore: Callable[[dict, dict], None], logs: Iterable[str | os.PathLike] = ()) -> bool:
        """Continue from the newest valid checkpoint, if there is one: ``restore(state, rank_state)`` puts back the
        trainer's objects and the loop's position (:meth:`load_state_dict`, or the fields one by one), then this
        rank's RNG is restored. ``metrics.jsonl`` and ``logs`` (files this rank writes) lose the rows past the
        checkpoint (every row when starting afresh). True when resumed."""
        loaded = self.ckpt.load()
        if loaded is not None:
            state, rank_state = loaded
            restore(state, rank_state)
            restore_rng(rank_state.get("rng", {}))
            self.log.info("resumed at step %d (epoch %d)", self.step, self.epoch)
        keep = self.step if loaded is not None else -1
        for path in ([self.metrics.path] if self.metrics.enabled else []) + [Path(p) for p in logs]:
            truncate_jsonl(path, keep)
        return loaded is not None

    def save_due(self) -> bool:
        """Whether the step just done gets a checkpoint (every ``ckpt_every`` steps, if > 0, and the last one; not right
        after a skipped step unless ``save_after_bad``)."""
        return (self.step == self.total or self.due(self.ckpt_every, last=False)) and (
            self.save_after_bad or self.guard.consecutive == 0)

    def save(self, state: dict, rank_state: dict | None = None) -> str:
        """Checkpoint ``state`` (rank 0's) and ``rank_state`` (each rank's; its RNG is added) at ``self.step``.
        Collective: every rank calls it."""
        return self.ckpt.save(self.step, state, {**(rank_state or {}), "rng": capture_rng()})

    # ----------------------------------------------------------------------------------------------- data
    def batches(self, open_data: Callable[[bool], Iterable], stops: Iterable[int] = ()) -> Iterator:
        """The run's batches until ``total_steps``, epoch after epoch. ``open_data(new_epoch)`` returns the data from
        the loop's position (``new_epoch``: at the start of ``self.epoch``; False: where a resumed run or a stop
        left it). With ``heap_reuse`` (CPU runs) the steps run under :func:`ov3common.heap.heap_reuse`: the same
        large activations and gradients are allocated every step, and glibc would otherwise map and unmap them. It is opened again after every epoch's end (:meth:`end_epoch`) and at every step in ``stops``
        (e.g. the start of a training stage at another resolution). Before each batch is handed out, torch is
        seeded from (seed, step, rank). An epoch that yields no batch from its start is an error."""
        with heap_reuse(self.heap_reuse):
            yield from self._batches(open_data, stops)

    def _batches(self, open_data: Callable[[bool], Iterable], stops: Iterable[int]) -> Iterator:
        stops = sorted(set(stops))
        self.bar = TrainProgress(self.total, self.step, self.desc, self.log_every, self.log)
        new_epoch = self.step == 0
        while self.step < self.total:
            stop = min([s for s in stops if s > self.step] + [self.total])
            n = 0
            for batch in open_data(new_epoch):
                torch.manual_seed(step_seed(self.seed, self.step, self.rank))
                n += 1
                yield batch
                if self.step >= stop:
                    break
            else:  # the epoch's data ran out (on every rank together)
                if n == 0 and new_epoch:
                    raise ValueError(f"{self.desc}: epoch {self.epoch} yields no batch from its start: the training "
                                     f"data holds less than one batch per rank (or per data stream)")
                self.end_epoch()
                new_epoch = True
                continue
            new_epoch = False
        self.bar.close()

    def end_epoch(self) -> None:
        """The epoch's data is exhausted: report its bad samples, then move to the start of the next epoch."""
        self.report_skips()
        self.epoch, self.consumed = self.epoch + 1, 0

    def report_skips(self) -> SkipStats:
        """Sum the bad-sample counts over the ranks (collective), log them (and, with ``skip_rows``, write them to
        ``metrics.jsonl``), and reset them. Returns the sums."""
        red = self.skips.reduce()
        red.log(self.log, self.epoch)
        if self.skip_rows:
            self.metrics.log(self.step, {"epoch": self.epoch, **{f"skipped/{k}": v for k, v in red.skipped.items()},
                                         **{f"converted/{k}": v for k, v in red.converted.items()},
                                         "skipped_total": red.total()})
        self.skips.reset()
        return red

    # ------------------------------------------------------------------------------------------- per step
    def poisoned(self) -> bool:
        """Tests: whether the current step's loss is to be made non-finite (``inject_nan_steps``, 1-based)."""
        return self.step + 1 in self.inject_nan_steps

    def advance(self, drawn: int = 0) -> None:
        """The current step is done (updated or skipped): ``step += 1``; ``drawn`` samples were consumed."""
        self.step += 1
        self.consumed += drawn

    def due(self, every: int, last: bool = True) -> bool:
        """Whether the step just done is a multiple of ``every`` (> 0), or (``last``) the final one."""
        return every > 0 and (self.step % every == 0 or (last and self.step == self.total))

    def report(self, n_samples: int, row: dict[str, Any] | None = None, info: str = "") -> None:
        """After every step: the progress (``n_samples`` over all ranks; the loss of ``row``; ``info`` on its
        line) and, when given, ``row`` to ``metrics.jsonl`` with ``samples_per_s`` and ``eta_s`` added."""
        self.bar.update(n_samples, None if row is None else row.get("loss"), info)
        if row is not None:
            self.metrics.log(self.step, {**row, "samples_per_s": self.bar.samples_per_s, "eta_s": self.bar.eta_s})

    def log_row(self, row: dict[str, Any], step: int | None = None) -> None:
        """A row to ``metrics.jsonl`` (rank 0) at ``step`` (default: the steps done)."""
        self.metrics.log(self.step if step is None else step, row)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
