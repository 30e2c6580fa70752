"""The pieces the real recipes need: per-stage warmup + cosine (encoder), RAE's constant-then-linear schedule, RAE's
random horizontal flips through the latent cache, and the trainers' progress lines (step / total, loss, ETA)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from encoder.export import load_encoder, write_random_export
from encoder.ov3 import OV3Model
from encoder.train import Config, StageConfig, build_schedule, forward_backward, micro_parts, split_batch
from encoder.vae import FrozenVAE, build_random_vae, tiny_vae_config
from eval.profile import encoder_batch
from ov3common.config import load_config
from ov3common.log import TrainProgress
from ov3common.optim import constant_then_linear, staged_warmup_cosine
from rae_generation.cache_latents import build_cache
from rae_generation.config import CacheConfig, RAETrainConfig
from rae_generation.data import LatentDataset, collate_images, open_source
from rae_generation.testing import make_image_folder


def lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def sgd(lr: float = 1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_each_stage_has_its_own_warmup_cosine_and_peak():
    opt = sgd(1e-3)
    lr = lrs(staged_warmup_cosine(opt, [(100, 1.0, 10, 0.0), (50, 0.025, 5, 0.0)]), opt, 160)
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # stage 1 warms up from 0
    assert lr[99] == pytest.approx(0.0, abs=1e-12)  # ... and decays to its floor at its last step
    assert lr[100] == pytest.approx(2.5e-5 / 5) and lr[104] == pytest.approx(2.5e-5)  # stage 2 warms up again
    assert max(lr[100:150]) == pytest.approx(2.5e-5)  # to its own peak
    assert lr[149] == pytest.approx(0.0, abs=1e-12) and lr[155] == pytest.approx(0.0, abs=1e-12)
    mid = 10 + (99 - 10) // 2
    assert lr[mid] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 89)))


def test_encoder_schedule_from_the_config():
    cfg = load_config(Config, "configs/encoder/ov3_b2.yaml",
                      ["train.stages.0.steps=20", "train.stages.0.warmup_steps=4", "train.stages.1.steps=10",
                       "train.stages.1.warmup_steps=2"])
    opt = sgd(cfg.train.lr)
    lr = lrs(build_schedule(opt, cfg.train), opt, 30)
    assert max(lr[:20]) == pytest.approx(1.024e-3) and max(lr[20:]) == pytest.approx(2.56e-5)
    assert lr[20] == pytest.approx(2.56e-5 / 2)
    single = load_config(Config, "configs/encoder/toy.yaml")
    assert single.train.schedule == "single"  # the measured toy recipe keeps one warmup + cosine


def rae_reference(step: int, warmup: int, decay_end: int, final: float) -> float:
    """RAE's build_scheduler 'linear' rule with warmup_from_zero=False (src/utils/optim_utils.py)."""
    if step < warmup:
        return 1.0
    if step >= decay_end:
        return final
    return 1.0 - (1.0 - final) * (step - warmup) / max(decay_end - warmup, 1)


def test_rae_linear_schedule_is_raes_rule():
    opt = sgd(2e-4)
    lr = lrs(constant_then_linear(opt, 40, 800, 0.1), opt, 1000)
    assert lr == pytest.approx([2e-4 * rae_reference(s, 40, 800, 0.1) for s in range(1000)])

    xl = load_config(RAETrainConfig, "configs/rae/imagenet_xl.yaml")
    assert (xl.train.schedule, list(xl.train.betas), xl.train.constant_steps, xl.train.decay_end_step) == \
        ("linear", [0.9, 0.95], 40 * 1251, 800 * 1251)
    assert xl.data.flip and xl.train.ema_decay == 0.9995 and xl.train.batch_size == 1024


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_random_export(tmp_path_factory.mktemp("enc") / "export", size="tiny", image_size=32)


def test_flip_cache_holds_the_mirrored_images_tokens(tmp_path, export):
    root = make_image_folder(tmp_path / "imgs", size=32, per_class=6)
    over = [f"source={root}", f"encoder={export}", "image_size=32", "batch_size=4", "num_workers=0",
            "device=cpu", "flip=true"]
    out = build_cache(load_config(CacheConfig, None, [*over, f"out_dir={tmp_path}/lat"]))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["flip"] is True
    enc = load_encoder(export, device="cpu")
    batch = collate_images([open_source(root, 32)[i] for i in range(3)])
    want = enc.encode(batch["images"].flip(-1))[0].float()
    ds = LatentDataset(out, flip=True)
    ds._mirror = torch.ones(len(ds), dtype=torch.bool)  # read every sample mirrored
    got = ds.__getitems__([0, 1, 2])["tokens"]
    assert torch.allclose(got, want, atol=1e-5)
    ds._mirror = None
    assert not torch.allclose(ds.__getitems__([0, 1, 2])["tokens"], want, atol=1e-3)
    ds.set_epoch(0, 0)
    a = ds._mirror.clone()
    ds.set_epoch(0, 1)
    assert 0 < int(a.sum()) < len(ds) and not torch.equal(a, ds._mirror)  # p = 0.5, a new draw each epoch
    ds.set_epoch(0, 0)
    assert torch.equal(a, ds._mirror)  # a function of (seed, epoch): exact resume
    plain = build_cache(load_config(CacheConfig, None, [*over[:-1], f"out_dir={tmp_path}/lat0"]))
    with pytest.raises(ValueError, match="data.flip: the latent cache .* holds no mirrored tokens"):
        LatentDataset(plain, flip=True)


def test_progress_lines_in_a_log_file(caplog):
    log = logging.getLogger("test.progress")
    bar = TrainProgress(total=20, initial=10, desc="enc", log_every=5, logger=log, enabled=True, tty=False)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for i in range(10):
            bar.update(8, loss=1.5 if (i + 1) % 5 == 0 else None, info="res 128")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # steps 15 and 20 only
    assert lines[0].startswith("enc 15/20 (75.0%) | loss 1.5000 | ") and "samples/s | ETA 0:00:0" in lines[0]
    assert lines[0].endswith("| res 128") and lines[1].startswith("enc 20/20 (100.0%)")
    assert bar.eta_s == 0 and bar.samples_per_s > 0


def test_progress_bar_on_a_terminal(capsys):
    bar = TrainProgress(total=4, desc="rae", log_every=2, enabled=True, tty=True)
    for _ in range(4):
        bar.update(2, loss=0.5)
    bar.close()
    err = capsys.readouterr().err
    assert "rae" in err and "4/4" in err and "loss 0.5000" in err


def test_micro_batches_accumulate_to_the_whole_batch():
    """A rank's batch in chunks (train.stages.N.micro_batch): the per-sample losses and their gradients equal the
    whole batch's (contrastive negatives are per chunk, so it is left out here)."""

    cfg = load_config(Config, None, ["model.size=tiny", "model.text_width=32", "model.text_depth=1",
                                     "model.text_heads=2", "model.text_decoder_width=32", "model.text_decoder_depth=1",
                                     "model.text_decoder_heads=2", "loss.w_contrastive=0.0", "loss.w_lpips=0.0",
                                     "data.max_text_len=12"])
    vae = FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=1.0)
    torch.manual_seed(0)
    model = OV3Model(cfg.model, cfg.loss, 50, 0, 12, vae)
    batch = encoder_batch(cfg, 6, 32, torch.device("cpu"), alt_len=8)
    batch.update(image=torch.rand(6, 3, 32, 32) * 2 - 1, recap=torch.randint(1, 50, (6, 12)),
                 alt=torch.randint(1, 50, (6, 8)), sent=torch.randint(1, 50, (6, 8)), n=6)
    counts = torch.tensor([6.0, 6.0 * 11])
    grads, losses = [], []
    for parts in (1, 3):
        model.zero_grad()
        losses.append(forward_backward(model, batch, parts, 1, counts, 1, False, torch.device("cpu")))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for k in ("caption", "latent_l1", "pixel_l1", "loss"):
        assert losses[1][k] == pytest.approx(float(losses[0][k]), rel=1e-5), k
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grads))
    sizes = [(c["n"], len(c["image"]), len(c["index"])) for c in split_batch(batch, 4)]
    assert len(sizes) == 4 and sum(s[0] for s in sizes) == 6 and all(a == b == c >= 1 for a, b, c in sizes)
    stage = StageConfig(resolution=32, steps=1, batch_size=64, micro_batch=16)
    assert micro_parts({"n": 64}, stage, 1, "cpu") == 4 and micro_parts({"n": 3}, stage, 1, "cpu") == 1
    assert micro_parts({"n": 64}, StageConfig(batch_size=64, micro_batch=0), 1, "cpu") == 1
