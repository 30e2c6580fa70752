import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ov3common.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    flatten_state,
    load_model_state,
    load_optim_state,
    model_state,
    optim_state,
    restore_rng,
    unflatten_state,
)
from ov3common.optim import build_adamw, warmup_cosine


def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = build_adamw(model, lr=1e-2, weight_decay=0.1)
    sched = warmup_cosine(opt, 2, 10)
    return model, opt, sched


def train_steps(model, opt, sched, n):
    for _ in range(n):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def full_state(model, opt, sched, step):
    return {"model": model_state(model), "optimizer": optim_state(model, opt), "scheduler": sched.state_dict(),
            "train": {"step": step, "epoch": 1, "consumed": 12}}


def test_flatten_roundtrip_preserves_types():
    state = {"a": torch.arange(3), "t": (1, 2.5, None), "d": {3: torch.ones(2), 4: "x"}, "n": np.arange(4),
             "nested": [{"b": torch.zeros(1, dtype=torch.bfloat16)}]}
    tree, tensors = flatten_state(state)
    json.dumps(tree)
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["t"] == (1, 2.5, None) and back["d"][4] == "x"
    assert torch.equal(back["d"][3], torch.ones(2)) and back["nested"][0]["b"].dtype == torch.bfloat16
    assert np.array_equal(back["n"], np.arange(4))


def test_save_load_exact_and_resume_matches(tmp_path):
    model, opt, sched = make_run()
    train_steps(model, opt, sched, 3)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    torch.manual_seed(123)
    mgr.save(3, full_state(model, opt, sched, 3), rank_state={"rng": capture_rng()})
    train_steps(model, opt, sched, 4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = make_run(seed=99)
    state, rank_state = mgr.load()
    load_model_state(model2, state["model"])
    load_optim_state(model2, opt2, state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng(rank_state["rng"])
    assert state["train"] == {"step": 3, "epoch": 1, "consumed": 12}
    train_steps(model2, opt2, sched2, 4)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_keep_last_and_latest(tmp_path):
    model, opt, sched = make_run()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, {"model": model_state(model), "train": {"step": step}})
    assert [p.name for p in mgr.all()] == ["step_00000002", "step_00000003"]
    assert mgr.latest().endswith("step_00000003")


def test_corrupt_latest_falls_back_and_explicit_raises(tmp_path, caplog):
    model, opt, sched = make_run()
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"model": model_state(model), "train": {"step": 1}})
    bad = mgr.save(2, {"model": model_state(model), "train": {"step": 2}})
    f = tmp_path / "step_00000002" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    state, _ = mgr.load()
    assert state["train"]["step"] == 1
    with pytest.raises(CheckpointError, match="sha256"):
        mgr.load(bad)
    f.write_bytes(bytes(data[:10]))
    with pytest.raises(CheckpointError, match="truncated"):
        mgr.load(bad)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import ov3common.checkpoint as C
    mgr = C.CheckpointManager(sys.argv[1])
    mgr.save(1, {"model": {"w": torch.full((1000,), 1.0)}, "train": {"step": 1}})
    real = C.save_file
    def dying_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    C.save_file = dying_save
    mgr.save(2, {"model": {"w": torch.full((1000,), 2.0)}, "train": {"step": 2}})
""")


def test_kill_during_save_keeps_previous(tmp_path):
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    assert (tmp_path / "step_00000002.tmp").exists()
    mgr = CheckpointManager(tmp_path)
    state, _ = mgr.load()
    assert state["train"]["step"] == 1 and torch.equal(state["model"]["w"], torch.full((1000,), 1.0))
    mgr.save(2, {"model": {"w": torch.zeros(2)}, "train": {"step": 2}})  # a new save clears the stale temp dir
    assert not (tmp_path / "step_00000002.tmp").exists()
    assert mgr.load()[0]["train"]["step"] == 2


def test_no_checkpoint_returns_none(tmp_path):
    assert CheckpointManager(tmp_path / "empty").load() is None
