"""Issue 7 for the LLaVA trainer: exact resume after SIGKILL, partial/corrupt checkpoints, NaN/Inf losses,
poisoned LLaVA JSON / tar shards, and config paths checked before any compute."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import llava_bridge.model as M
from llava_bridge.config import LlavaTrainConfig
from llava_bridge.data import Collator, LlavaDataset
from llava_bridge.train import build, main
from llava_bridge.trainer import find_resumable_checkpoint
from llava_bridge.vision import build_processor
from ov3common.config import ConfigError, load_config
from ov3common.guard import TrainingDiverged
from ov3common.images import SkipStats
from ov3common.toyworld import poison
from tests.helpers import python_module, run_with_kills
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.test_llava_model import overrides


def stage2(w, out, **kw):
    return overrides(w, out, **{"model.template": "vicuna_v1", "data.train": f"[{w['instruct']}]",
                                "train.tune": "full", "data.group_by_modality_length": True, **kw})


def by_step(path: Path) -> list:
    """The sample ids of each step; a step re-run after a resume keeps its last occurrence."""
    steps: dict = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["ids"]
    return [steps[k] for k in sorted(steps)]


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise(llava_world, tmp_path):
    kw = {"train.max_steps": 9, "train.batch_size": 2, "train.ckpt_every": 1, "train.log_indices": True,
          "train.lr": 1e-3}  # 9 steps × 2 > 11 samples: crosses an epoch boundary
    ref, run = tmp_path / "ref", tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocesses (OMP_NUM_THREADS=1): same reduction order, bitwise
    try:
        assert main(stage2(llava_world, ref, **kw)) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = python_module("llava_bridge.train", *stage2(llava_world, run, **kw))
    killed = run_with_kills(cmd, run / "metrics.jsonl", kills=2, min_step=1, max_step=3, seed=1, timeout=400)
    assert len(killed) == 2
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    order = by_step(run / "samples.jsonl")
    assert order == by_step(ref / "samples.jsonl") and len(order) == 9
    first_epoch = [i for ids in order[:6] for i in ids][:11]
    assert len(set(first_epoch)) == 11  # within an epoch no sample seen twice or skipped


def test_corrupt_and_partial_checkpoints_fall_back(llava_world, tmp_path, caplog):
    assert main(overrides(llava_world, tmp_path, **{"train.max_steps": 3, "train.ckpt_every": 1,
                                                    "train.keep_last": 3})) == 0
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    weights = tmp_path / "checkpoint-3" / "mm_projector.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # a torn write
    partial = tmp_path / "checkpoint-4"
    partial.mkdir()  # killed before trainer_state.json
    (partial / "mm_projector.safetensors").write_bytes(b"")
    assert find_resumable_checkpoint(tmp_path, quarantine=True) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / ".bad-checkpoint-3").is_dir() and (tmp_path / ".bad-checkpoint-4").is_dir()
    # resuming uses checkpoint-2 and finishes
    assert main(overrides(llava_world, tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 1})) == 0
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert not list(tmp_path.glob("checkpoint-*/*.pt")) and not list(tmp_path.glob("checkpoint-*/*.pth"))


class PoisonLoss(TrainerCallback):
    """Multiplies the LM head's output by NaN on the chosen (1-based) steps, and snapshots the projector."""

    def __init__(self, model, steps):
        self.steps, self.on, self.snap = set(steps), False, {}
        model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan") if self.on else o)
        self.proj = model.model.mm_projector

    def on_step_begin(self, args, state, control, **kw):
        self.on = state.global_step + 1 in self.steps

    def on_step_end(self, args, state, control, **kw):
        self.snap[state.global_step] = [p.detach().clone() for p in self.proj.parameters()]


def test_nonfinite_loss_step_is_skipped(llava_world, tmp_path):
    cfg = load_config(LlavaTrainConfig, None, overrides(llava_world, tmp_path, **{"train.max_steps": 4}))
    trainer, _ = build(cfg)
    cb = PoisonLoss(trainer.model, {2})
    trainer.add_callback(cb)
    trainer.train()
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(cb.snap[a], cb.snap[b]))
    assert same(2, 1) and not same(3, 2) and not same(4, 3)
    assert trainer.guard.skipped_total == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nonfinite_skipped") == 1 for r in logged)


def test_consecutive_nonfinite_losses_stop_and_keep_last_good(llava_world, tmp_path):
    cfg = load_config(LlavaTrainConfig, None, overrides(llava_world, tmp_path, **{
        "train.max_steps": 8, "train.ckpt_every": 1, "train.max_bad_steps": 3, "train.keep_last": 10}))
    trainer, _ = build(cfg)
    cb = PoisonLoss(trainer.model, {3, 4, 5})
    trainer.add_callback(cb)
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        trainer.train()
    last = find_resumable_checkpoint(tmp_path)
    assert last == str(tmp_path / "checkpoint-4")  # step 5 diverged: nothing saved after it
    good = load_file(tmp_path / "checkpoint-2" / "mm_projector.safetensors")
    kept = load_file(Path(last) / "mm_projector.safetensors")
    assert all(torch.equal(good[k], kept[k]) and torch.isfinite(kept[k]).all() for k in good)


def test_main_returns_nonzero_on_divergence(llava_world, tmp_path, monkeypatch):
    monkeypatch.setattr(M.LlavaMixin, "encode_images", lambda self, *a, **k: torch.full(
        (4, 4, self.config.hidden_size), float("inf")))
    assert main(overrides(llava_world, tmp_path, **{"train.max_bad_steps": 2})) == 3


def test_poisoned_llava_json_and_shard(word_tokenizer, llava_world, tmp_path):
    root = tmp_path / "images"
    manifest = poison.write_poisoned_llava(str(tmp_path / "poison.json"), str(root))
    shard_manifest = poison.write_poisoned_shard(str(tmp_path / "shard" / "shard-000000.tar"))
    expected = Counter(manifest.values()) + Counter(poison.expected_counts(shard_manifest))

    stats = SkipStats()
    ds = LlavaDataset([str(tmp_path / "poison.json"), str(tmp_path / "shard")], str(root), word_tokenizer,
                      "plain", build_processor(llava_world["enc"]), 256, 4, stats)
    batch = Collator(word_tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    for k, v in batch["_skip"]["skipped"].items():
        stats.skipped[k] += v
    stats.converted.update(batch["_skip"]["converted"])
    assert dict(stats.skipped) == {k: v for k, v in expected.items() if k != "keep"}
    assert len(ds) - sum(batch["_skip"]["skipped"].values()) == expected["keep"]
    assert sum(stats.converted.values()) >= 7  # CMYK, 16-bit, RGBA, palette, grayscale (shard + JSON)
    assert batch["images"].shape[1:] == (3, 32, 32) and torch.isfinite(batch["images"]).all()
    # and through the trainer: no crash, counts reported
    out = tmp_path / "run"
    assert main(overrides(llava_world, out, **{"data.train": f"[{tmp_path / 'poison.json'},{tmp_path / 'shard'}]",
                                               "data.image_root": root, "train.max_steps": 3})) == 0
    report = json.loads((out / "skip_stats.json").read_text())
    assert report["skipped_total"] > 0 and report["skipped"].get("missing_image") == expected["missing_image"]


def test_paths_checked_before_compute(llava_world, tmp_path):
    with pytest.raises(ConfigError, match="make pretrain-encoder"):
        main(overrides(llava_world, tmp_path, **{"model.vision_tower": tmp_path / "nope"}))
    with pytest.raises(ConfigError, match="make toy-llm"):
        main(overrides(llava_world, tmp_path, **{"model.llm": tmp_path / "nope"}))
    with pytest.raises(ConfigError, match="train.tune"):
        main(overrides(llava_world, tmp_path, **{"train.tune": "everything"}))
    assert not (tmp_path / "train_config.yaml").exists()
