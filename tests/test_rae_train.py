"""The RAE trainer: EMA, a tiny run's loss decreases, NaN/Inf steps, exact resume after SIGKILL (issue 7)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoder.export import write_random_export
from ov3common.checkpoint import CheckpointManager, load_safetensors
from ov3common.config import load_config
from ov3common.dist import init_distributed
from ov3common.guard import TrainingDiverged
from ov3common.log import read_jsonl
from rae_generation.cache_latents import build_cache
from rae_generation.config import CacheConfig, RAETrainConfig
from rae_generation.data import ImageFolderSource
from rae_generation.testing import bad_images, make_image_folder, make_poisoned_folder
from rae_generation.train import main, train, update_ema
from tests.helpers import python_module, run_with_kills, subprocess_env


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """64 images of 4 classes at 32 px through a random tiny export → a latent cache (4 tokens x 64)."""

    root = tmp_path_factory.mktemp("rae_train")
    enc = write_random_export(root / "export", size="tiny", image_size=32)
    imgs = make_image_folder(root / "imgs", num_classes=4, per_class=16, size=32)
    over = [f"source={imgs}", f"encoder={enc}", f"out_dir={root / 'lat'}", "image_size=32", "num_workers=0",
            "device=cpu", "batch_size=32"]
    return build_cache(load_config(CacheConfig, None, over))


def overrides(latents, out, **kw) -> list[str]:
    base = {"out_dir": out, "data.latents": latents, "model.size": "tiny", "train.batch_size": 8, "train.steps": 16,
            "train.lr": 3e-3, "train.log_every": 1, "train.ckpt_every": 4, "train.preview": False,
            "train.device": "cpu", "train.ema_decay": 0.9, "train.warmup_steps": 0,
            "train.compile": False}  # the toy recipe compiles; these tests check the loop (compiled: test_perf)
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def run_inprocess(latents, out, **kw) -> Path:
    cfg = load_config(RAETrainConfig, "configs/rae/toy.yaml", overrides(latents, out, **kw))
    return train(cfg, init_distributed("cpu"))


def test_ema_update_formula():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for b, pe, pm in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(pe, 0.9 * b + 0.1 * pm)
    update_ema(ema, model, 0.0)
    for pe, pm in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(pe, pm)


def test_tiny_run_loss_decreases_and_writes_run_folder(latents, tmp_path):
    out = run_inprocess(latents, tmp_path / "run", **{"train.steps": 60, "train.ckpt_every": 30})
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    spec = json.loads((out / "generator.json").read_text())
    assert spec["model"]["grid"] == 2 and spec["model"]["in_dim"] == 64 and spec["classes"][0] == "class_00"
    assert (out / "stats.safetensors").is_file() and (out / "config.yaml").is_file()
    assert Path(CheckpointManager(out / "checkpoints").latest()).name == "step_00000060"


def test_nan_step_is_skipped_and_logged(latents, tmp_path, caplog):
    out = run_inprocess(latents, tmp_path / "run", **{"train.steps": 6, "train.inject_nan_steps": "[3]"})
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
    assert rows[-1]["skipped_total"] == 1
    assert "non-finite" in caplog.text
    state, _ = CheckpointManager(out / "checkpoints").load()
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_consecutive_bad_steps_stop_and_keep_good_checkpoint(latents, tmp_path):
    argv = ["--config", "configs/rae/toy.yaml"] + overrides(
        latents, tmp_path / "run", **{"train.inject_nan_steps": "[5,6,7]", "train.max_bad_steps": 3,
                                       "train.ckpt_every": 2})
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 3
    ckpts = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts.all()][-1] == "step_00000006"  # nothing written after the stop
    good4 = load_safetensors(tmp_path / "run/checkpoints/step_00000004/model.safetensors")
    last = load_safetensors(tmp_path / "run/checkpoints/step_00000006/model.safetensors")
    for k, v in good4.items():
        assert torch.isfinite(last[k]).all() and torch.equal(last[k], v)  # skipped steps left the weights alone
    with pytest.raises(TrainingDiverged):
        run_inprocess(latents, tmp_path / "run2", **{"train.inject_nan_steps": "[2,3]", "train.max_bad_steps": 2})


def _indices(out: Path) -> dict[int, tuple[int, list[int]]]:
    by_step = {}
    for r in read_jsonl(out / "indices_rank0.jsonl"):
        by_step[r["step"]] = (r["epoch"], r["index"])  # a re-run step after a resume overwrites the lost one
    return by_step


@pytest.mark.slow
def test_exact_resume_after_sigkill(latents, tmp_path):
    kw = {"train.steps": 20, "train.ckpt_every": 3, "train.log_indices": True}
    cmd = lambda out: python_module("rae_generation.train", "--config", "configs/rae/toy.yaml",  # noqa: E731
                                    *overrides(latents, out, **kw))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_with_kills(cmd(ref), ref / "metrics.jsonl", kills=0, env=subprocess_env())
    at = run_with_kills(cmd(killed), killed / "metrics.jsonl", kills=3, min_step=1, max_step=6, seed=7,
                        env=subprocess_env())
    assert len(at) == 3
    for group in ("model", "ema"):
        a = load_safetensors(ref / f"checkpoints/step_00000020/{group}.safetensors")
        b = load_safetensors(killed / f"checkpoints/step_00000020/{group}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    ia, ib = _indices(ref), _indices(killed)
    assert ia == ib and sorted(ia) == list(range(20))
    for epoch in (0, 1):  # 64 samples, batch 8: each epoch sees every sample exactly once
        seen = [i for s, (e, idx) in ib.items() if e == epoch for i in idx]
        assert sorted(seen) == list(range(64))


@pytest.mark.slow
def test_ddp_two_ranks_shard_the_data_and_resume(latents, tmp_path):
    out = tmp_path / "ddp"

    def launch(steps: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rae_generation.train", "--config", "configs/rae/toy.yaml",
               *overrides(latents, out, **{"train.steps": steps, "train.ckpt_every": 3, "train.batch_size": 16,
                                           "train.log_indices": True})]
        res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    launch(3)
    launch(6)  # resumes from step 3 under DDP
    r0, r1 = _indices(out), _indices_rank(out, 1)
    assert sorted(r0) == sorted(r1) == list(range(6))
    for s in range(4):  # 64 samples, 2 ranks x 8 per step: steps 0-3 are epoch 0, disjoint across ranks
        assert not set(r0[s][1]) & set(r1[s][1])
    seen = [i for s in range(4) for i in r0[s][1] + r1[s][1]]
    assert sorted(seen) == list(range(64))
    assert Path(CheckpointManager(out / "checkpoints").latest()).name == "step_00000006"


def _indices_rank(out: Path, rank: int) -> dict[int, tuple[int, list[int]]]:
    return {r["step"]: (r["epoch"], r["index"]) for r in read_jsonl(out / f"indices_rank{rank}.jsonl")}


def test_on_the_fly_encoding_of_a_poisoned_folder(latents, tmp_path):
    root, _ = make_poisoned_folder(tmp_path / "poison", size=32, good_per_class=6)
    enc = Path(latents).parent / "export"
    out = run_inprocess("''", tmp_path / "run", **{"data.images": root, "data.encoder": enc, "train.steps": 5,
                                                    "train.batch_size": 4, "data.stats_samples": 64, "data.image_size": 32,
                                                    "train.log_indices": True})
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 5 and all(isinstance(r["loss"], float) for r in rows)
    files = ImageFolderSource(root, 32).files
    reasons = {f"bad_{k}": r for k, (_, r) in bad_images(32).items()}
    seen = [i for _, (_, idx) in _indices(out).items() for i in idx]
    expect = sum(1 for i in seen if reasons.get(files[i][0].name))
    state, _ = CheckpointManager(out / "checkpoints").load()
    assert expect > 0 and sum(state["train"]["skips"]["skipped"].values()) == expect  # skipped, counted per reason


def test_resume_refuses_a_run_on_other_data_or_model(latents, tmp_path):
    run_inprocess(latents, tmp_path / "run", **{"train.steps": 2, "train.ckpt_every": 2})
    with pytest.raises(ValueError, match="resume is impossible"):
        run_inprocess(latents, tmp_path / "run", **{"train.steps": 4, "model.width": 48})
    spec = tmp_path / "run" / "generator.json"
    spec.write_text(spec.read_text().replace('"data": "', '"data": "stale'))
    with pytest.raises(ValueError, match="other data"):
        run_inprocess(latents, tmp_path / "run", **{"train.steps": 4})
