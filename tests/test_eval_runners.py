"""rFID (random encoder export, τ = 0), gFID (fake generator), reconstruction metrics."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

from encoder.export import load_encoder, write_random_export
from eval import gfid, inception, recon, rfid

PALETTE = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


def fake_generator(labels: torch.Tensor) -> torch.Tensor:
    """Class c -> a flat image of colour c with a little noise (seeded by the caller)."""
    base = PALETTE[labels % len(PALETTE)][:, :, None, None].expand(-1, -1, 32, 32)
    return (base * 0.8 + 0.1 * torch.randn(len(labels), 3, 32, 32)).clamp(-1, 1)


def fake_sampler(run_dir: str, device: str, **options):
    """The sampler interface eval.gfid.load_sampler expects: (generate, class names)."""
    return fake_generator, [f"class{i}" for i in range(len(PALETTE))]


@pytest.fixture(scope="module")
def weights(request) -> Path:
    path = Path(request.config.cache.mkdir("eval_inception")) / "inception.pth"
    if not path.is_file() or not inception.weights_note(path).get("check", {}).get("passed"):
        inception.build_fid_weights(path, n_check=2)
    return path


def test_psnr_ssim_hand_values():
    ref = torch.zeros(2, 3, 16, 16) - 1  # black in [-1, 1] = 0 in [0, 1]
    rec = ref + 0.2  # +0.1 in [0, 1]: MSE 0.01 -> 20 dB
    assert recon.psnr(ref, rec) == pytest.approx([20.0, 20.0], abs=1e-6)
    assert recon.psnr(ref, ref).tolist() == [recon.PSNR_CAP] * 2
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert recon.ssim(img, img)[0] == pytest.approx(1.0)
    noisy = (img + 0.3 * torch.randn(1, 3, 32, 32, generator=g)).clamp(-1, 1)
    very = (img + 0.9 * torch.randn(1, 3, 32, 32, generator=g)).clamp(-1, 1)
    assert 1.0 > recon.ssim(img, noisy)[0] > recon.ssim(img, very)[0]
    with pytest.raises(ValueError, match="differ in shape"):
        recon.psnr(img, img[:, :, :16])
    with pytest.raises(ValueError, match="11x11"):
        recon.ssim(img[:, :, :8, :8], img[:, :, :8, :8])
    acc = recon.ReconMetrics()
    acc.update(ref, rec)
    acc.update(img, img)
    r = acc.result()
    assert r["n"] == 3 and r["psnr"] == pytest.approx((20 + 20 + 100) / 3) and r["lpips"] is None
    assert r["intervals"]["psnr"]["low"] <= r["psnr"] <= r["intervals"]["psnr"]["high"] and r["ssim_data_range"] == 1


def _ssim_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos (scikit-image's), noise, a flat bright image and a non-square one, with distortions."""

    g = torch.Generator().manual_seed(0)
    photos = [data.astronaut()[:96, :96], data.chelsea()[:96, :96], data.coffee()[:96, :96]]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.cat([x, torch.rand(2, 3, 96, 96, generator=g) * 2 - 1, torch.full((1, 3, 96, 96), 0.98)])
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    y[3] = torch.nn.functional.avg_pool2d(x[3:4], 3, 1, 1)[0]  # blur
    y[5] = 0.96  # flat vs flat
    return x, y


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
def test_torch_ssim_and_psnr_match_scikit_image(window):
    x, y = _ssim_test_set()
    ref = recon.ssim_skimage(x, y, window)
    assert np.abs(recon.ssim(x, y, window) - ref).max() < 1e-5  # float32 (default): within 1e-4 with margin
    assert np.abs(recon.ssim(x, y, window, torch.float64) - ref).max() < 1e-10  # float64: exact
    assert np.abs(recon.psnr(x, y) - recon.psnr_skimage(x, y)).max() < 1e-9
    wide = (x[:2, :, :40], y[:2, :, :40])  # non-square
    assert np.allclose(recon.ssim(*wide, window), recon.ssim_skimage(*wide, window), atol=1e-5)
    batched = np.concatenate([recon.ssim(x[i:i + 1], y[i:i + 1], window) for i in range(len(x))])
    assert np.array_equal(batched, recon.ssim(x, y, window))  # per image: the batch does not matter
    fast, ref = recon.ReconMetrics(ssim_window=window), recon.ReconMetrics(ssim_window=window, reference=True)
    fast.update(x, y)
    ref.update(x, y)
    assert fast.result()["ssim"] == pytest.approx(ref.result()["ssim"], abs=1e-5)


def test_lpips_random_backbone_is_labelled(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no local backbone weights here
    m = recon.LPIPSMetric("alex", backbone="auto")
    assert m.random_backbone and m.label == recon.RANDOM_LABEL
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert np.allclose(m(x, x), 0.0) and (m(x, -x) > 0).all()
    acc = recon.ReconMetrics(m)
    acc.update(x, -x)
    assert acc.result()["lpips_note"] == recon.RANDOM_LABEL and acc.result()["lpips_random_backbone"]
    with pytest.raises(FileNotFoundError):
        recon.LPIPSMetric("alex", backbone="pretrained")

    local = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), local)
    real = recon.LPIPSMetric("alex", backbone="auto", backbone_path=str(local))
    assert not real.random_backbone and str(local) in real.label and real(x, -x).shape == (2,)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_fast_path_matches_the_lpips_package(net, tmp_path, monkeypatch):
    """The batched channels_last forward (fused conv + ReLU, lin as a matrix-vector product) against the lpips
    package's own forward, with a torchvision-initialised backbone loaded as weights (values up to ~0.1)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    tv = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[net]()
    torch.save(tv.state_dict(), tmp_path / "backbone.pth")
    m = recon.LPIPSMetric(net, backbone="pretrained", backbone_path=str(tmp_path / "backbone.pth"))
    x, y = _ssim_test_set()
    x, y = x[:, :, :64, :48], y[:, :, :64, :48]  # non-square, small
    ref = m.package(x, y)
    got = m(x, y)
    assert ref.max() > 0.05 and np.abs(got - ref).max() < 1e-6
    assert np.array_equal(np.concatenate([m(x[i:i + 1], y[i:i + 1]) for i in range(len(x))]), got)  # per image
    fast, slow = recon.ReconMetrics(m), recon.ReconMetrics(m, reference=True)
    fast.update(x, y)
    slow.update(x, y)
    assert fast.result()["lpips"] == pytest.approx(slow.result()["lpips"], abs=1e-6)


@pytest.fixture(scope="module")
def val_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("val")
    g = np.random.default_rng(0)
    for i in range(8):
        a = np.zeros((80, 72, 3), np.uint8)  # not square, not the export size: centre-crop + resize
        a[..., i % 3] = 60 + 20 * i
        a[20:50, 20:50] = g.integers(0, 255, 3)
        Image.fromarray(a).save(d / f"{i:03d}.jpg")
    return d


def test_rfid_with_random_export(weights, val_images, tmp_path):
    exp = write_random_export(tmp_path / "export", image_size=64)
    enc = load_encoder(exp)
    paths = rfid.select_images(val_images, 5)
    o1, r1, m1, grid = rfid.reconstruct(enc, paths, batch_size=4)
    _, r2, _, _ = rfid.reconstruct(enc, paths, batch_size=4)
    _, r3, _, _ = rfid.reconstruct(enc, paths, batch_size=3)
    assert o1.shape == r1.shape == (5, 64, 64, 3) and o1.dtype == np.uint8
    assert np.array_equal(r1, r2)  # τ = 0: no noise
    assert np.abs(r1.astype(int) - r3).max() <= 1  # batch size only changes float round-off
    assert grid.shape == (10, 3, 64, 64) and m1["n"] == 5
    res = rfid.run_rfid(exp, val_images, tmp_path / "out", weights=weights, max_images=5, batch_size=4,
                        cache_dir=tmp_path / "cache", kid_subsets=2)
    assert res["rfid"] > 0 and np.isfinite(res["psnr"]) and 0 < res["ssim"] < 1
    assert res["lpips"] is None and res["lpips_note"] == "LPIPS not computed"
    assert Path(res["grid"]).is_file()
    assert json.loads((tmp_path / "out" / "rfid.json").read_text())["rfid"] == pytest.approx(res["rfid"])
    assert res["fid_details"]["real_stats"] == "computed"
    again = rfid.run_rfid(exp, val_images, tmp_path / "out2", weights=weights, max_images=5, batch_size=4,
                          cache_dir=tmp_path / "cache", kid_subsets=2)  # a second evaluation on the same val set
    assert again["fid_details"]["real_stats"] == "cache" and again["rfid"] == res["rfid"]  # originals cached


def test_gfid_with_fake_generator(weights, tmp_path):
    imgs, labels = gfid.generate_samples(fake_generator, num_classes=4, per_class=3, batch_size=5, seed=1)
    again, _ = gfid.generate_samples(fake_generator, num_classes=4, per_class=3, batch_size=5, seed=1)
    assert imgs.shape == (12, 32, 32, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert np.array_equal(imgs, again)
    npz = gfid.write_samples_npz(tmp_path / "samples.npz", imgs, labels)
    with np.load(npz) as z:
        assert np.array_equal(z["arr_0"], imgs) and np.array_equal(z["arr_1"], labels)
    real = tmp_path / "classes"
    real_imgs, real_labels = gfid.generate_samples(fake_generator, 4, 2, seed=7)
    for i, (a, c) in enumerate(zip(real_imgs, real_labels)):
        (real / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(real / f"class{c}" / f"{i}.png")
    files = gfid.class_real_images(real, per_class=1)
    assert len(files) == 4 and [f.parent.name for f in files[:2]] == ["class0", "class1"]
    real_files = gfid.class_real_images(real)
    assert len(real_files) == 8
    good = gfid.run_gfid(npz, real_files, tmp_path / "g", weights=weights, kid_subsets=2,
                         class_names=[d.name for d in gfid.class_folders(real)], cache_dir=tmp_path / "c")
    bad_imgs, _ = gfid.generate_samples(lambda y: fake_generator((y + 1) % 4) * -1, 4, 2, seed=1)
    bad = gfid.run_gfid(bad_imgs, real_files, tmp_path / "b", weights=weights, kid_subsets=2,
                        cache_dir=tmp_path / "c")
    assert bad["fid_details"]["real_stats"] == "cache"
    assert 0 <= good["gfid"] < bad["gfid"]
    assert good["per_class"] == 3 and Path(good["grid"]).is_file() and good["fid_details"]["fake"] == str(npz)
    gen, names = gfid.load_sampler("tests.test_eval_runners:fake_sampler", "unused", "cpu")
    assert names[0] == "class0" and gen(torch.tensor([1])).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="sampler: expected .module:name."):
        gfid.load_sampler("no_colon", "x", "cpu")
    with pytest.raises(ValueError, match="want \\[B, 3, H, W\\]"):
        gfid.generate_samples(lambda y: torch.zeros(len(y), 32, 32), 2, 1)
