"""Encoder trainer on a tiny toy world: smoke run + export, losses go down, NaN guard, poisoned shard, latent cache.

(Exact resume under SIGKILL and the 2-process torchrun equivalence are in test_encoder_resume.py.)
"""

import json
import math

import pytest
import torch

from encoder.cache_latents import CacheConfig, cache_latents
from encoder.export import load_encoder
from encoder.ov3 import LossConfig, ModelConfig, OV3Model
from encoder.train import Config, train
from encoder.vae import FrozenVAE, build_random_vae
from ov3common.checkpoint import CheckpointManager
from ov3common.config import load_config
from ov3common.guard import TrainingDiverged
from ov3common.log import read_jsonl
from ov3common.toyworld import ToyConfig, generate
from ov3common.toyworld.poison import expected_counts, write_poisoned_shard

TINY = [
    "vae.random_tiny=true", "vae.path=''", "model.size=tiny", "model.text_width=32", "model.text_depth=1",
    "model.text_heads=2", "model.text_decoder_width=32", "model.text_decoder_depth=1", "model.text_decoder_heads=2",
    "data.max_text_len=24", "data.val_size=16", "train.log_every=1", "train.warmup_steps=2", "train.strategy=none",
]


def stages(*s):
    return "train.stages=[" + ",".join(f"{{resolution: {r}, steps: {n}, batch_size: {b}}}" for r, n, b in s) + "]"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "encoder_toy"  # shared by every module importing this fixture
    if (root / "meta.json").is_file():
        return root
    generate(str(root), ToyConfig(resolution=32, n_train=96, n_val=32, n_test=4, shard_size=32, class_train=1,
                                  class_val=1, pope_images=4, seedbench_per_category=1), workers=1, progress=False)
    return root


def cfg_for(toy_root, out, *extra):
    return load_config(Config, "configs/encoder/toy.yaml",
                       [f"out_dir={out}", f"data.root={toy_root}", *TINY, *extra])


def test_smoke_two_stages_export_and_logs(toy_root, tmp_path):
    out = tmp_path / "run"
    summary = train(cfg_for(toy_root, out, stages((16, 6, 8), (32, 4, 8)), "train.ckpt_every=5"))
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["resolution"] for r in steps] == [16] * 6 + [32] * 4
    for k in ("caption", "contrastive", "pixel_l1", "latent_l1", "loss", "lr", "logit_scale"):
        assert all(math.isfinite(r[k]) for r in steps), k
    assert abs(steps[0]["logit_scale"] - 1 / 0.07) < 0.1
    assert any("untrained/val/psnr" in r for r in rows) and "psnr_gain_db" in summary
    assert (out / "recon_grid.png").is_file() and (out / "summary.json").is_file()

    enc = load_encoder(out / "export")
    tok, pooled = enc.encode(torch.zeros(2, 3, 32, 32))
    assert tok.shape == (2, 4, 64) and enc.image_size == 32 and enc.tau == 0.8


def test_losses_decrease(toy_root, tmp_path):
    """Overfit a few batches: every loss term falls."""
    out = tmp_path / "run"
    train(cfg_for(toy_root, out, stages((32, 40, 16)), "train.lr=2e-3", "train.ckpt_every=1000",
                  "export_dir=none", "data.train_shards=" + str(toy_root / "wds/train/shard-000000.tar")))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    first, last = rows[:4], rows[-4:]
    for k in ("caption", "contrastive", "latent_l1", "pixel_l1", "loss"):
        a, b = sum(r[k] for r in first) / 4, sum(r[k] for r in last) / 4
        assert b < a, (k, a, b)


def test_nan_steps_skipped_then_run_stops(toy_root, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(toy_root, out, stages((16, 6, 8)), "train.inject_nan_steps=[2]", "export_dir=none"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped_step")] == [2]
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps_skipped"] == 1
    out2 = tmp_path / "run2"
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        train(cfg_for(toy_root, out2, stages((16, 8, 8)), "train.inject_nan_steps=[3,4,5]", "train.max_bad_steps=3",
                      "train.ckpt_every=2", "export_dir=none"))

    latest = CheckpointManager(out2 / "checkpoints").latest()
    assert latest is not None and latest.endswith("step_00000002")  # the last good one is kept


def test_poisoned_shard_counts(toy_root, tmp_path):
    shard = tmp_path / "poison" / "shard-000000.tar"
    manifest = write_poisoned_shard(str(shard), n_good=8, resolution=32)
    n = len(manifest)
    # the encoder's policy: an unparsable KEY.json drops only the metadata (the sample trains on its alt-text)
    expected = {k: v for k, v in expected_counts(manifest).items() if k not in ("keep", "bad_json")}
    out = tmp_path / "run"
    train(cfg_for(toy_root, out, stages((32, 2, n // 2 * 2 // 2)), f"data.train_shards={shard}", "export_dir=none"))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "skipped_total" in r]
    got = {k.split("/", 1)[1]: v for k, v in rows[0].items() if k.startswith("skipped/")}
    assert got == expected
    conv = {k.split("/", 1)[1]: v for k, v in rows[0].items() if k.startswith("converted/")}
    assert conv["cmyk"] == 1 and conv["16bit"] == 1 and conv["alpha"] == 1 and conv["grayscale"] == 1
    assert conv["palette"] == 1
    assert conv["meta_dropped"] == 1 and conv["recap_from_alt"] >= 1


def test_cached_latents_match_on_the_fly(toy_root, tmp_path):
    base = [f"data.root={toy_root}", *TINY, stages((16, 3, 8), (32, 2, 8)), "export_dir=none"]
    meta = cache_latents(load_config(CacheConfig, "configs/encoder/toy.yaml",
                                     [*base, f"cache.out_dir={tmp_path / 'lat'}", "cache.batch_size=20"]))
    assert meta["resolutions"] == [16, 32] and meta["n"] == 96
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.safetensors")) == [  # one file per data shard
        f"shard-{i:06d}.safetensors" for i in range(3)]
    s1 = train(load_config(Config, "configs/encoder/toy.yaml", [*base, f"out_dir={tmp_path / 'a'}"]))
    s2 = train(load_config(Config, "configs/encoder/toy.yaml",
                           [*base, f"out_dir={tmp_path / 'b'}", f"data.latent_cache={tmp_path / 'lat'}"]))
    ra = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    rb = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert ra == pytest.approx(rb, rel=1e-4) and s1["val/psnr"] == pytest.approx(s2["val/psnr"], rel=1e-4)
    # a run with another VAE (here: another latent scaling) refuses the cache before any step
    with pytest.raises(ValueError, match="built with another VAE"):
        train(load_config(Config, "configs/encoder/toy.yaml", [*base, f"out_dir={tmp_path / 'c'}",
                                                                f"data.latent_cache={tmp_path / 'lat'}",
                                                                "vae.scaling_factor=0.5"]))


def test_bf16_autocast_and_grad_checkpointing_run(toy_root, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(toy_root, out, stages((16, 2, 8)), "train.precision=bf16", "model.grad_checkpointing=true",
                  "export_dir=none"))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_rec_stop_grad_keeps_reconstruction_gradient_out_of_the_encoder():
    torch.manual_seed(0)
    mc = ModelConfig(size="tiny", text_width=32, text_depth=1, text_heads=2, text_decoder_width=32,
                     text_decoder_depth=1, text_decoder_heads=2)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "alt": ids, "sent": ids, "recap": ids,
             "index": torch.arange(2)}
    n, nt = torch.tensor(2.0), torch.tensor(5.0)
    for stop in (False, True):
        lc = LossConfig(w_und=0.0, w_lpips=0.0, rec_stop_grad=stop)
        model = OV3Model(mc, lc, 10, 0, 8, FrozenVAE(build_random_vae()))
        model(batch, 0, n, nt)["loss"].backward()
        enc_grad = model.vit.blocks[0].attn.qkv.weight.grad
        assert model.decoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert (enc_grad is None or enc_grad.abs().sum() == 0) == stop
