"""FID: weight conversion check, self-FID ~ 0, Gaussian closed form, ADM npz reading, statistics cache."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage import data
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_statistics_to_metric

from eval import fid as F
from eval import inception as I
from eval.bench_fid import encoder_bench_rfid
from eval.bench_fid import main as bench_fid_main
from eval.fid_bootstrap import fid_interval
from eval.fused import ConvReLU
from eval.intervals import bootstrap
from eval.toygen import toy_metrics
from ov3common.checkpoint import save_safetensors
from rae_generation.classify import ToyClassifier


@pytest.fixture(scope="session")
def weights(request) -> Path:
    """Converted Inception weights, built once and kept in pytest's cache dir between runs."""
    path = Path(request.config.cache.mkdir("eval_inception")) / "inception.pth"
    if not path.is_file() or not I.weights_note(path).get("check", {}).get("passed"):
        I.build_fid_weights(path, n_check=2)
    return path


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory):
    """Two small folders of different-looking images (sizes vary within a folder)."""
    root = tmp_path_factory.mktemp("fid_images")
    g = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(6):
            size = 32 if i % 2 else 40
            if name == "a":
                arr = (g.uniform(0, 1, (size, size, 3)) * 255).astype(np.uint8)
            else:
                arr = np.zeros((size, size, 3), np.uint8)
                arr[:, : size // 2, i % 3] = 50 + 20 * i
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root / "a", root / "b"


def test_build_weights_reproduces_torchscript_features(tmp_path):
    report = I.build_fid_weights(tmp_path / "w.pth", n_check=2)
    assert report["check"]["passed"] and report["check"]["max_rel_diff"] < 1e-4
    assert report["check"]["spatial_max_rel_diff"] < 1e-4  # ADM's mixed_6/conv[:7] from the TorchScript layers
    assert report["has_logits"] is False
    assert I.weights_note(tmp_path / "w.pth")["check"]["n_images"] == 2
    assert not F.has_logits(tmp_path / "w.pth")


def test_convert_state_dict_rejects_wrong_source():
    sd = I.load_torchscript(I.find_fid_helper_model()).state_dict()
    full = I.convert_state_dict(sd)
    assert full["fc.weight"].shape == (1008, 2048) and float(full["fc.weight"].abs().sum()) == 0
    missing = {k: v for k, v in sd.items() if not k.startswith("net.layers.mixed_10.conv.")}
    with pytest.raises(I.FidWeightsError, match="mixed_10.conv"):
        I.convert_state_dict(missing)
    with pytest.raises(I.FidWeightsError, match="does not use"):
        I.convert_state_dict({**sd, "net.extra.weight": torch.zeros(1)})


def _closed_form(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("dim", [1, 4, 32])
def test_frechet_distance_equals_gaussian_closed_form(dim):
    g = np.random.default_rng(dim)
    a, b = g.normal(size=(dim, dim)), g.normal(size=(dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = g.normal(size=dim), g.normal(size=dim)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-6)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 + |mu1 - mu2|^2
    d1, d2 = g.uniform(0.1, 2, dim), g.uniform(0.1, 2, dim)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert F.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(exact, rel=1e-9)
    assert F.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_parity_with_torch_fidelity_and_low_rank_path():
    g = np.random.default_rng(1)
    f1 = g.normal(size=(20, 64)) * g.uniform(0.5, 2, 64)  # N < D: singular covariance
    f2 = g.normal(size=(300, 64)) + 0.3
    mu1, s1 = F.gaussian_stats(f1)
    mu2, s2 = F.gaussian_stats(f2)
    ref = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    ref = ref["frechet_inception_distance"]
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert F.frechet_distance(mu1, s1, mu2, s2, features1=f1) == pytest.approx(ref, rel=1e-6)
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-6)
    with pytest.raises(F.FidInputError, match="shapes differ"):
        F.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n,d,device", [(48, 96, "cpu"), (120, 40, "cpu"),  # N < D: N x N path; N > D: Gram
                                        pytest.param(120, 40, "cuda", marks=_CUDA)])
def test_fid_interval_equals_per_resample_frechet_distance(n, d, device):
    """The bootstrap's shortcuts (N < D: N x N quantities; N > D: one weighted Gram matrix in torch per resample)
    give, resample by resample, the FID that gaussian_stats + frechet_distance (parity-tested against
    torch-fidelity above) give on the resampled features."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + 0.3
    mu2, s2 = F.gaussian_stats(rng.normal(size=(2 * d, d)))

    def stat(idx):
        mu, sigma = F.gaussian_stats(f[idx])
        return F.frechet_distance(mu, sigma, mu2, s2, features1=f[idx])

    want = bootstrap(stat, n, n_boot=30, seed=5, batched=False).to_dict()
    got = fid_interval(f, mu2, s2, n_boot=30, seed=5, device=device)
    for k in ("low", "high"):
        assert got[k] == pytest.approx(want[k], rel=1e-9), k


def test_gaussian_samples_statistics():
    g = np.random.default_rng(0)
    x = g.normal(size=(20000, 3)) * [1.0, 2.0, 0.5] + [1, 0, -1]
    mu, sigma = F.gaussian_stats(x.astype(np.float32))
    assert np.allclose(mu, [1, 0, -1], atol=0.05) and np.allclose(np.diag(sigma), [1, 4, 0.25], rtol=0.05)
    with pytest.raises(F.FidInputError, match="at least 2"):
        F.gaussian_stats(x[:1])


def test_fid_of_a_set_against_itself_is_zero(weights, image_dirs, tmp_path):
    a, b = image_dirs
    r = F.compute_metrics(a, a, weights, cache_dir=tmp_path / "cache", kid_subsets=5)
    assert abs(r["fid"]) < 1e-2
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["inception_score"] is None and "logits" in r["is_unavailable"]
    assert abs(r["sfid"]) < 1e-2 and r["ref_stats_sha256"] == F.stats_sha256(*F.gaussian_stats(
        F.extract(F.list_images(a), weights)["pool"]))
    assert r["n_fake"] == r["n_real"] == 6 and any("< 2048" in n for n in r["notes"])
    other = F.compute_metrics(b, a, weights, cache_dir=tmp_path / "cache", kid_subsets=5)
    assert other["real_stats"] == "cache" and other["fid"] > 50 and other["kid_mean"] > r["kid_mean"]


def test_adm_npz_reading(weights, image_dirs, tmp_path):
    a, _ = image_dirs
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in F.list_images(a)[:4]])
    f = F.extract(imgs, weights)
    mu, sigma = F.gaussian_stats(f["pool"])
    mu_s, sigma_s = F.gaussian_stats(f["spatial"])
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=mu + 1.0, sigma=sigma)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=imgs)
    r = F.compute_metrics(samples, ref, weights, kid_subsets=5)
    assert r["real_stats"] == "npz mu/sigma" and abs(r["fid"]) < 1e-2 and r["kid_mean"] is not None
    assert abs(r["sfid"]) < 1e-2 and r["ref_file_sha256"] == F.file_sha256(ref)
    assert r["ref_stats_sha256"] == F.stats_sha256(mu, sigma) and r["n_fake"] == 4
    r2 = F.compute_metrics(samples, stats_only, weights)
    assert r2["fid"] == pytest.approx(2048.0, rel=1e-3)  # mean shifted by 1 in each of 2048 dims
    assert r2["kid_mean"] is None and r2["precision"] is None
    assert r2["sfid"] is None and "mu_s" in r2["sfid_unavailable"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=imgs.astype(np.float32))
    with pytest.raises(F.FidInputError, match="uint8 NHWC"):
        F.read_npz(bad)
    np.savez(bad, mu=mu)
    with pytest.raises(F.FidInputError, match="only one of mu / sigma"):
        F.read_npz(bad)
    np.savez(bad, other=mu)
    with pytest.raises(F.FidInputError, match="none of arr_0"):
        F.read_npz(bad)


def test_cache_key_follows_files_and_weights(weights, image_dirs, tmp_path):
    a, _ = image_dirs
    files = F.list_images(a)
    k1 = F.input_key(a, weights)
    assert k1 == F.input_key(a, weights) and F.input_key(files, weights) == F.input_key(files, weights)
    other_w = tmp_path / "w2.pth"
    other_w.write_bytes(b"different")
    assert F.input_key(a, other_w) != k1
    assert F.input_key(files[:-1], weights) != F.input_key(files, weights)
    arr = np.zeros((2, 8, 8, 3), np.uint8)
    k_arr = F.input_key(arr, weights)
    arr[0, 0, 0, 0] = 1
    assert F.input_key(arr, weights) != k_arr


def test_cli_errors(tmp_path, capsys):
    assert F.main(["--fake", str(tmp_path / "nope"), "--real", str(tmp_path), "--weights",
                   str(tmp_path / "w.pth")]) == 2
    assert "make fid-weights" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(F.FidInputError, match="no images"):
        F.list_images(tmp_path / "empty")


def test_inception_score_only_with_classifier_weights(weights, tmp_path):
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    with_fc = tmp_path / "with_fc.pth"
    torch.save(sd, with_fc)  # no check note: has_logits falls back to a non-zero fc
    assert F.has_logits(with_fc) and not F.has_logits(weights)
    imgs = (np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3))).astype(np.uint8)
    r = F.compute_metrics(imgs, imgs.copy(), with_fc, kid=False, prc=False)
    assert r["inception_score"] >= 1.0 - 1e-6 and "is_unavailable" not in r and abs(r["fid"]) < 1e-2


def test_inception_score_is_adms_rule():
    uniform = np.zeros((10, 1008))
    assert F.inception_score_adm(uniform) == pytest.approx(1.0)  # p(y|x) = p(y): KL 0
    onehot = np.full((8, 1008), -1e4)
    onehot[np.arange(8), np.arange(8)] = 0.0  # 8 distinct confident classes: exp(log 8)
    assert F.inception_score_adm(onehot) == pytest.approx(8.0, rel=1e-6)
    assert F.inception_score_adm(onehot, split_size=4) == pytest.approx(4.0, rel=1e-6)  # splits in order


def _photo_crops(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = g.integers(0, p.shape[0] - size), g.integers(0, p.shape[1] - size)
        out.append(p[y:y + size, x:x + size, :3])
    return np.ascontiguousarray(np.stack(out))


def test_features_and_scores_do_not_depend_on_batch_size(weights):
    """Batch sizes 1, 7 and 100 (one batch) on 9 images: bitwise the same features, FID / sFID within 1e-4. The
    fused (BN folded, channels_last) extractor differs from torch-fidelity's module by float round-off only
    (features within 1e-4 of their scale, FID within 1e-6 relative at this badly conditioned N = 9; the
    1,000-image check of FID within 1e-4 is ``python -m eval.bench_fid``)."""
    fake, real = _photo_crops(9, seed=0), _photo_crops(9, seed=1)
    ref = F.extract(real, weights, batch_size=100)
    mu, sigma = F.gaussian_stats(ref["pool"])
    mu_s, sigma_s = F.gaussian_stats(ref["spatial"])
    runs = {}
    for bs, fused in ((1, True), (7, True), (100, True), (7, False)):
        f = F.extract(fake, weights, batch_size=bs, fused=fused)
        runs[bs, fused] = (f, F.frechet_distance(*F.gaussian_stats(f["pool"]), mu, sigma, features1=f["pool"]),
                           F.frechet_distance(*F.gaussian_stats(f["spatial"]), mu_s, sigma_s, features1=f["spatial"]))
    base_f, base_fid, base_sfid = runs[100, True]
    assert base_fid > 10 and base_sfid > 1  # different crops: a real distance
    for key, (f, fid, sfid) in runs.items():
        if key[1]:  # fused, any batch size: exactly the same
            assert np.array_equal(f["pool"], base_f["pool"]) and np.array_equal(f["spatial"], base_f["spatial"]), key
            assert abs(fid - base_fid) < 1e-4 and abs(sfid - base_sfid) < 1e-4, key
        else:
            assert np.abs(f["pool"] - base_f["pool"]).max() <= 1e-4 * np.abs(base_f["pool"]).max()
            assert abs(fid - base_fid) < 1e-6 * base_fid and abs(sfid - base_sfid) < 1e-6 * base_sfid


@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 3, 400, 300), (1, 3, 299, 299), (3, 3, 256, 256)])
def test_tf1_resize_is_torch_fidelitys_bitwise(shape):
    """Up, down, non-square and identity: the separable resize gives torch-fidelity's TF 1.x resize bit for bit."""
    u = torch.from_numpy(np.random.default_rng(shape[-1]).integers(0, 256, shape, dtype=np.uint8))
    ref = interpolate_bilinear_2d_like_tensorflow1x(u.float(), size=(299, 299), align_corners=False)
    got = I.tf1_resize(u)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, ref)
    # with torch-fidelity's normalisation, from an NCHW view of NHWC memory (what iter_uint8_batches yields)
    view = u.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(I.tf1_resize(view, normalize=True), (ref - 128) / 128)


@pytest.mark.parametrize("kernel, stride, padding", [((3, 3), 2, (0, 0)), ((1, 7), 1, (0, 3)), ((1, 1), 1, (0, 0))])
def test_conv_relu_fused_equals_conv_then_relu(kernel, stride, padding):
    """oneDNN's convolution with a ReLU post-op on reordered weights = conv2d then ReLU, bit for bit; at a batch
    size other than the one the weights were reordered for, and on the fallback path."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, kernel, stride=stride, padding=padding)
    x = torch.randn(5, 16, 17, 17, generator=g).contiguous(memory_format=torch.channels_last)
    ref = torch.relu(conv(x)).detach()
    m = ConvReLU(conv)
    ref64 = torch.relu(torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride,
                                                  padding))
    assert torch.equal(m.double()(x.double()), ref64)  # float64: the fallback, conv2d + relu_
    m.float().pack([32, 16, 17, 17])  # reordered for batch 32, run at 5
    got = m(x)
    assert m._packed is not None and torch.equal(got, ref) and (ref == 0).any() and (ref > 0).any()


def test_conv_relu_linear_part_and_merged_convolutions():
    """relu=False is conv2d alone (bitwise, both paths); a merged ConvReLU gives its parts' outputs side by side
    (fp32 round-off: oneDNN may block a wider output differently); parts of another geometry are refused."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    convs = [torch.nn.Conv2d(16, n, 1) for n in (8, 5, 12)]
    parts = [ConvReLU(c) for c in convs]
    ref = [c(x).detach() for c in convs]
    # (oneDNN may pick another kernel than aten's conv2d for this shape depending on threads: round-off only)
    torch.testing.assert_close(parts[0](x, relu=False), ref[0], rtol=1e-6, atol=1e-6)
    assert (parts[0](x, relu=False) < 0).any() and (ref[0] < 0).any()
    assert torch.equal(parts[0].double()(x.double(), relu=False),
                       torch.nn.functional.conv2d(x.double(), convs[0].weight.double(), convs[0].bias.double()))
    parts[0].float()
    got = ConvReLU.merged(parts)(x)
    assert got.shape == (3, 25, 9, 9)
    torch.testing.assert_close(got, torch.relu(torch.cat(ref, 1)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ in input or geometry"):
        ConvReLU.merged([parts[0], ConvReLU(torch.nn.Conv2d(16, 4, 3, padding=1))])


def test_restructured_blocks_compute_torch_fidelitys_blocks(weights):
    """The 35x35 blocks with merged 1x1 heads and every average-pool branch pooled after its 1x1 convolution give
    the BN-folded torch-fidelity blocks' outputs (fp32 round-off; borders included, where TF's pool counts fewer
    pixels); ADM's spatial features are still read from Mixed_6d.branch1x1."""
    ext = I.InceptionExtractor(weights)
    assert all(type(getattr(ext.net, n)).__name__ == "_MergedA" for n in I.BLOCKS_A)
    assert all(type(getattr(ext.net, n)).__name__ == "_PoolFirstC" for n in I.BLOCKS_C)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, c, hw in (("Mixed_5b", 192, 35), ("Mixed_5d", 288, 35), ("Mixed_6d", 768, 17)):
            x = torch.randn(2, c, hw, hw, generator=g).relu().contiguous(memory_format=torch.channels_last)
            new = getattr(ext.net, name)
            ref = new.block(x)  # torch-fidelity's forward over the same (BN-folded) modules
            got = new(x)
            assert got.shape == ref.shape
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), name
        feats = ext(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)))
    assert feats["spatial"].shape == (2, 17 * 17 * I.SPATIAL_CHANNELS)


def test_toy_fid_in_classifier_features_sees_a_colour_shift(tmp_path):


    torch.manual_seed(0)
    save_safetensors(tmp_path / "clf" / "pixels.safetensors", ToyClassifier(2).state_dict())
    (tmp_path / "clf" / "pixels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    for i, im in enumerate(real):
        folder = tmp_path / "real" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i}.png")
    labels = np.arange(40) % 2
    np.savez(tmp_path / "same.npz", arr_0=real, arr_1=labels)
    np.savez(tmp_path / "dark.npz", arr_0=real // 3, arr_1=labels)  # darker: the features move, FID rises
    same = toy_metrics(tmp_path / "clf", tmp_path / "same.npz", tmp_path / "real", image_size=16, n_boot=20)
    dark = toy_metrics(tmp_path / "clf", tmp_path / "dark.npz", tmp_path / "real", image_size=16, n_boot=20)
    assert abs(same["toy_fid"]) < 1e-6 and same["num_real"] == 40 and same["toy_fid_interval"]["n"] == 40
    assert dark["toy_fid_interval"]["low"] > same["toy_fid_interval"]["high"]
    assert 0 <= same["class_acc_interval"]["low"] <= same["class_acc"] <= same["class_acc_interval"]["high"] <= 1


def test_bench_pipeline_variants_agree_and_warm_reads_the_cache(weights, tmp_path):
    """``make bench``'s rFID row (eval.bench_fid): before / now cold / now warm on 4 pairs give the same numbers;
    the warm run takes the originals' features from the cache (only the reconstructions through Inception)."""
    (tmp_path / "val").mkdir()
    for i, a in enumerate(_photo_crops(4, size=32)):
        Image.fromarray(a).save(tmp_path / "val" / f"{i}.png")
    cfg = SimpleNamespace(rfid_images=tmp_path / "val", rfid_max_images=4, rfid_batch=2, rfid_weights=weights)
    r = encoder_bench_rfid(cfg, torch.device("cpu"))
    v = r["variants"]
    assert list(v) == ["before", "now_cold", "now_warm"] and r["n"] == 4 and r["image_size"] == [32, 32]
    assert [v[k]["inception_images"] for k in v] == [8, 8, 4]
    for k in ("now_cold", "now_warm"):
        p = r["parity"][k]
        assert p["same_numbers"] and p["fid_abs_diff"] < 1e-6 * v["before"]["fid"] and p["psnr_abs_diff"] < 1e-9
        assert p["ssim_abs_diff_max_image"] < 1e-5 and p["lpips_abs_diff_max_image"] < 1e-6
        assert r["speedup"][k]["total"] > 0 and isinstance(r["meets_3x"][k], bool)
    assert v["now_warm"]["fid"] == v["now_cold"]["fid"]  # the cache holds the cold run's features
    assert "| now_warm |" in r["markdown"] and "now_warm: as now_cold" in r["markdown"]


def test_bench_fid_cli_spread(weights, tmp_path):
    """``python -m eval.bench_fid spread``: FID / sFID at batch sizes 1, 7, 100 are the same (fused extractor)."""
    assert bench_fid_main(["spread", "--n", "6", "--size", "32", "--weights", str(weights),
                           "--out", str(tmp_path / "s.json")]) == 0
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["fused"] and set(r["by_batch_size"]) == {"1", "7", "100"} and r["fid_spread"] == r["sfid_spread"] == 0.0
