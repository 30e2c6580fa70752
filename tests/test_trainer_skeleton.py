"""ov3common.trainer.Loop, the skeleton the encoder, decoder and RAE trainers share, on a tiny step function: a
killed run resumed from its checkpoint ends bitwise equal to an uninterrupted one (same samples, same metrics
rows), the NaN/Inf guard and its save policy, keep_last, epochs and stops, progress rates with the display off."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ov3common import checkpoint as C
from ov3common.data import ResumableSampler
from ov3common.guard import TrainingDiverged
from ov3common.images import SkipStats
from ov3common.log import read_jsonl
from ov3common.trainer import Loop, truncate_jsonl

N, BATCH = 20, 4  # 5 steps per epoch


class Toy(Dataset):
    """y = x · w + noise; every 7th sample is "bad" (counted by the step, like an undecodable image)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(N, generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i], "y": self.y[i]}


class Killed(Exception):
    pass


def run(out, total=12, kill_at=None, seen=None, **kw):
    """One attempt of a toy run in ``out`` (resuming from its checkpoints); raises Killed at step ``kill_at``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sampler = ResumableSampler(N, seed=0)
    ds = Toy()
    kw = {"log_every": 1, "ckpt_every": 3, "keep_last": 2, **kw}
    loop = Loop(out, total, "toy", seed=0, **kw)

    def restore(state, rank_state):
        C.load_model_state(model, state["model"])
        C.load_optim_state(model, opt, state["optim"])
        loop.load_state_dict(state["train"])

    def open_data(new_epoch):
        sampler.set_epoch(loop.epoch, loop.consumed)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler, drop_last=True)

    loop.resume(restore)
    for batch in loop.batches(open_data):
        if loop.step == kill_at:
            raise Killed
        if seen is not None:
            seen[loop.step] = (loop.epoch, batch["index"].tolist())
        loop.skips.skipped.update("bad" for i in batch["index"].tolist() if i % 7 == 0)
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])  # randomness of the step: from (seed, step, rank)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), batch["y"])
        if loop.poisoned():
            loss = loss * float("nan")
        loss.backward()
        if not loop.guard.bad(loss, loop.step, grads_of=model):
            opt.step()
        opt.zero_grad(set_to_none=True)
        loop.advance(drawn=BATCH)
        loop.report(BATCH, {"loss": loss.item(), "epoch": loop.epoch} if loop.due(loop.log_every) else None)
        if loop.save_due():
            loop.save({"model": C.model_state(model), "optim": C.optim_state(model, opt),
                       "train": loop.state_dict()})
    loop.close()
    return model, loop


def test_resume_after_kills_is_bitwise_exact(tmp_path):
    seen_ref, seen = {}, {}
    ref, _ = run(tmp_path / "ref", seen=seen_ref)
    for kill_at in (4, 8):  # checkpoints every 3 steps: the 2nd attempt redoes step 4, the 3rd steps 7-8
        with pytest.raises(Killed):
            run(tmp_path / "killed", kill_at=kill_at, seen=seen)
    model, loop = run(tmp_path / "killed", seen=seen)
    assert loop.step == 12 and loop.epoch == 2 and loop.consumed == 8  # 12 steps of 5 per epoch
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert seen == seen_ref and sorted(seen) == list(range(12))
    for epoch in (0, 1):  # each epoch sees every sample exactly once
        assert sorted(i for e, idx in seen.values() if e == epoch for i in idx) == list(range(N))
    rows = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # the rows past the checkpoint a kill left are gone
    ref_rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_nan_guard_skips_then_stops_and_the_save_policy(tmp_path):
    before, _ = run(tmp_path / "two", total=2)
    model, loop = run(tmp_path / "nan", total=6, ckpt_every=1, keep_last=10, inject_nan_steps=[3])
    assert loop.guard.skipped_total == 1 and loop.guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = [int(p.name[5:]) for p in loop.ckpt.all()]
    assert steps == [1, 2, 4, 5, 6]  # none right after the skipped step: the latest checkpoint is a good one
    state, _ = loop.ckpt.load()
    assert state["train"]["guard"] == {"consecutive": 0, "skipped_total": 1}
    _, loop = run(tmp_path / "nan_saved", total=6, ckpt_every=1, keep_last=10, inject_nan_steps=[3],
                  save_after_bad=True)
    assert [int(p.name[5:]) for p in loop.ckpt.all()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TrainingDiverged, match="2 consecutive"):
        run(tmp_path / "stop", total=6, ckpt_every=1, keep_last=10, inject_nan_steps=[3, 4], max_bad_steps=2)
    last = C.CheckpointManager(tmp_path / "stop" / "checkpoints")
    assert last.latest().endswith("step_00000002")
    good = C.CheckpointManager(tmp_path / "two" / "checkpoints").load()[0]["model"]
    assert all(torch.equal(v, last.load()[0]["model"][k]) for k, v in good.items())
    assert all(torch.equal(v, good[k]) for k, v in before.state_dict().items())  # the same run up to step 2


def test_keep_last_and_per_epoch_skip_counts(tmp_path):
    seen = {}
    _, loop = run(tmp_path / "run", total=12, ckpt_every=2, keep_last=2, skip_rows=True, seen=seen)
    assert [p.name for p in loop.ckpt.all()] == ["step_00000010", "step_00000012"]
    epochs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "skipped_total" in r]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(5, 0), (10, 1)]  # one row at each epoch's end
    assert all(r["skipped/bad"] == r["skipped_total"] == 3 for r in epochs)  # samples 0, 7 and 14 each epoch
    third = sum(i % 7 == 0 for s in (10, 11) for i in seen[s][1])  # the third epoch's two steps so far
    assert loop.skips.total() == third  # reset at each epoch's end, not cumulative
    assert sum(loop.ckpt.load()[0]["train"]["skips"]["skipped"].values()) == third


def test_stops_reopen_the_data_mid_epoch_and_an_empty_epoch_is_an_error(tmp_path):
    loop = Loop(tmp_path / "a", 7, "toy", ckpt_every=100)
    opened = []

    def open_data(new_epoch):
        opened.append((loop.step, loop.epoch, new_epoch))
        start = 0 if new_epoch else loop.consumed
        return range(start, 4)  # 4 batches per epoch

    for _ in loop.batches(open_data, stops=[2, 5]):
        loop.advance(drawn=1)
        loop.report(1)
    assert opened == [(0, 0, True), (2, 0, False), (4, 1, True), (5, 1, False)]
    assert (loop.step, loop.epoch) == (7, 1)
    loop = Loop(tmp_path / "b", 3, "toy")
    with pytest.raises(ValueError, match="yields no batch"):
        for _ in loop.batches(lambda new_epoch: []):
            pass


def test_progress_rates_and_eta_with_the_display_off(tmp_path, monkeypatch):
    monkeypatch.setenv("OV3_NO_PROGRESS", "1")
    _, loop = run(tmp_path / "run", total=10, log_every=5)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(isinstance(r["samples_per_s"], float) and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["eta_s"] > 0 and rows[1]["eta_s"] == 0 and math.isfinite(rows[0]["eta_s"])


def test_truncate_jsonl_and_skipstats_reset(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f'{{"step": {i}}}\n' for i in range(1, 6)) + '{"step": 6')  # a torn last line
    truncate_jsonl(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    truncate_jsonl(path, -1)
    assert read_jsonl(path) == []
    truncate_jsonl(tmp_path / "missing.jsonl", 3)
    assert not (tmp_path / "missing.jsonl").exists()
    s = SkipStats()
    s.add("truncated")
    s.converted["cmyk"] += 1
    s.reset()
    assert s.total() == 0 and s.as_dict() == {"skipped": {}, "converted": {}, "skipped_total": 0}


@pytest.mark.parametrize("every", [0, -1])
def test_ckpt_every_zero_or_less_saves_only_the_last_step(tmp_path, every):
    """``ckpt_every <= 0`` means no intermediate checkpoints (as the LLaVA trainer's ``ckpt_every: 0``), not one
    per step."""
    _, loop = run(tmp_path / "run", total=6, ckpt_every=every, keep_last=10)
    saved = loop.ckpt.all()
    assert len(saved) == 1 and loop.ckpt.load()[0]["train"]["step"] == 6
