"""Stage 2 (LLM + projector) under DeepSpeed ZeRO-3 with 2 CPU processes (torchrun, gloo), through the HF
Trainer; the gathered model folder loads back with the right projector shapes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llava_bridge.model import load_llava, load_lm
from tests.helpers import REPO, subprocess_env
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.test_llava_model import overrides


@pytest.mark.slow
def test_stage2_zero3_two_processes(llava_world, tmp_path):
    args = overrides(llava_world, tmp_path, **{
        "model.template": "vicuna_v1", "data.train": f"[{llava_world['instruct']}]", "train.tune": "full",
        "train.max_steps": 3, "train.batch_size": 2, "train.lr": 1e-3, "data.group_by_modality_length": True,
        "train.deepspeed": REPO / "configs/llava/zero3.json"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llava_bridge.train", *args]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    sd = load_file(tmp_path / "model.safetensors")
    assert sd["model.mm_projector.0.weight"].shape == (32, 64) and sd["model.mm_projector.2.weight"].shape == (32, 32)
    base = load_lm(llava_world["llm"])
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, sd["model.layers.0.self_attn.q_proj.weight"])
    model, tok = load_llava(tmp_path)
    assert torch.equal(model.model.mm_projector[2].weight, sd["model.mm_projector.2.weight"])
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) >= 3


@pytest.mark.slow
def test_zero2_two_processes_resume_after_sigkill_is_bitwise(llava_world, tmp_path):
    """DeepSpeed ZeRO-2 through the HF Trainer, 2 processes: killed once and resumed from its DeepSpeed checkpoint
    (partitioned optimizer states + data position), the final weights equal those of an uninterrupted run."""
    from tests.helpers import run_with_kills

    def cmd(out):
        args = overrides(llava_world, out, **{
            "model.template": "vicuna_v1", "data.train": f"[{llava_world['instruct']}]", "train.tune": "full",
            "train.max_steps": 5, "train.batch_size": 2, "train.lr": 1e-3, "train.ckpt_every": 1,
            "train.deepspeed": REPO / "configs/llava/zero2.json"})
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llava_bridge.train", *args]

    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(cmd(ref), env=subprocess_env(), capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    killed = run_with_kills(cmd(run), run / "metrics.jsonl", kills=1, min_step=2, max_step=3, seed=0, timeout=600)
    assert len(killed) == 1 and killed[0] < 5
    # it resumed (step 1 was trained once) from a DeepSpeed checkpoint (partitioned optimizer states)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r].count(1) == 1
    assert len(list((run / "checkpoint-5").glob("global_step5/*optim_states.pt"))) == 2  # one partition per rank
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
