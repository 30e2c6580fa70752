"""Decoder-only trainer (make rae-decoder): only the decoder learns, loss goes down, the export carries the new
decoder with the same encoder, a decoder-less (converted) export gains decode(), SIGKILL + resume is bitwise."""

import json

import pytest
import torch

from encoder.export import export_encoder, load_encoder, write_random_export
from encoder.train_decoder import Config, train
from ov3common.checkpoint import CheckpointManager
from ov3common.config import load_config
from ov3common.log import read_jsonl
from tests.helpers import REPO, python_module, run_with_kills
from tests.test_encoder_train import toy_root  # noqa: F401 (session fixture)

TINY = ["train.batch_size=8", "train.log_every=1", "train.warmup_steps=2", "train.strategy=none",
        "train.threads=1", "data.val_size=16", "loss.w_lpips=0", "rfid.images=''", "train.lr=2e-3"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny encoder export (32 px, 4 tokens) with a random decoder of its own."""
    return write_random_export(tmp_path_factory.mktemp("src") / "export", size="tiny", image_size=32, seed=1)


def cfg_for(root, src, out, *extra):
    return load_config(Config, str(REPO / "configs/encoder/decoder_toy.yaml"),
                       [f"out_dir={out}", f"encoder={src}", f"data.root={root}", *TINY, *extra])


def run(root, src, out, *extra):
    threads = torch.get_num_threads()
    try:
        return train(cfg_for(root, src, out, *extra))
    finally:
        torch.set_num_threads(threads)


def test_trains_only_the_decoder_and_exports_it(toy_root, source, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = run(toy_root, source, out, "train.steps=30")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert {"pixel_l1", "latent_l1"} <= set(rows[0]) and "lpips" not in rows[0]
    src, new = load_encoder(source), load_encoder(out / "export")
    assert all(torch.equal(a, b) for a, b in zip(src.vit.state_dict().values(), new.vit.state_dict().values()))
    assert not torch.equal(src.decoder.out.weight, new.decoder.out.weight)
    assert new.config["decoder_training"]["steps"] == 30 and new.tau == src.tau
    assert summary["psnr_gap_db"] == pytest.approx(summary["source/val/psnr"] - summary["val/psnr"])
    assert summary["val/psnr"] > summary["source/val/psnr"]  # the source decoder is random
    img = new.decode(new.encode(torch.zeros(2, 3, 32, 32))[0])
    assert img.shape == (2, 3, 32, 32)
    assert json.loads((out / "summary.json").read_text())["val/n"] == 16 and (out / "recon_grid.png").is_file()


def test_init_export_starts_from_the_exports_decoder(toy_root, source, tmp_path):  # noqa: F811
    summary = run(toy_root, source, tmp_path / "zero", "train.steps=0", "model.init=export")
    assert summary["val/psnr"] == summary["source/val/psnr"]  # nothing trained: the same decoder, same images
    with pytest.raises(ValueError, match="model.init"):
        run(toy_root, source, tmp_path / "bad", "train.steps=0", "model.init=pretrained")  # refused at load, naming the key


def test_decoder_less_export_gains_a_decoder(toy_root, tmp_path):  # noqa: F811
    full = load_encoder(write_random_export(tmp_path / "full", size="tiny", image_size=32, seed=2))
    bare = export_encoder(tmp_path / "bare", full.vit, None, full.vae, 32, tau=0.0, extra={"source": "official"})
    with pytest.raises(RuntimeError, match="no ViT decoder"):
        load_encoder(bare).decode(torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="has no decoder"):
        run(toy_root, bare, tmp_path / "x", "train.steps=1", "model.init=export")
    summary = run(toy_root, bare, tmp_path / "run", "train.steps=4", "loss.tau_units=rms")
    assert "source/val/psnr" not in summary and summary["tau"] > 0
    enc = load_encoder(tmp_path / "run" / "export")
    assert enc.decoder is not None and enc.config["source"] == "official" and enc.tau == 0.0
    assert enc.decode(enc.encode(torch.zeros(1, 3, 32, 32))[0]).shape == (1, 3, 32, 32)
    # model.init=fresh drops a decoder: the run on the export that has one trains the very same decoder
    dropped = run(toy_root, tmp_path / "full", tmp_path / "dropped", "train.steps=4", "loss.tau_units=rms")
    assert dropped["val/psnr"] == summary["val/psnr"] and "source/val/psnr" in dropped
    other = load_encoder(tmp_path / "dropped" / "export").decoder.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in enc.decoder.state_dict().items())


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_exact(toy_root, source, tmp_path):  # noqa: F811
    steps = ["train.steps=16", "train.ckpt_every=3"]  # 16 × 8 over 96 images: crosses an epoch boundary
    run(toy_root, source, tmp_path / "ref", *steps)
    cmd = python_module("encoder.train_decoder", "--config", str(REPO / "configs/encoder/decoder_toy.yaml"),
                        f"out_dir={tmp_path / 'killed'}", f"encoder={source}", f"data.root={toy_root}", *TINY, *steps)
    kills = run_with_kills(cmd, tmp_path / "killed" / "metrics.jsonl", kills=2, min_step=2, max_step=6, seed=1,
                           timeout=600)
    assert len(kills) == 2
    a, b = (CheckpointManager(tmp_path / d / "checkpoints").load()[0]["model"] for d in ("ref", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert rows == list(range(1, 17))
