"""Latent cache: poisoned ImageFolder / webdataset shard through the cacher, shards, normalisation statistics."""

import json
import shutil

import pytest
import torch

from encoder.export import write_random_export
from ov3common.config import load_config
from ov3common.toyworld.poison import BAD_KINDS, write_poisoned_shard
from rae_generation.cache_latents import build_cache
from rae_generation.config import CacheConfig
from rae_generation.data import LatentDataset, Normalizer, open_source, token_sums
from rae_generation.testing import make_image_folder, make_poisoned_folder, make_poisoned_shard

CONVERTED = {"cmyk", "16bit", "alpha", "palette", "grayscale"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_random_export(tmp_path_factory.mktemp("enc") / "export", size="tiny", image_size=32)


def cache(source, encoder, out, **kw):
    over = [f"source={source}", f"encoder={encoder}", f"out_dir={out}", "image_size=32", "batch_size=8",
            "num_workers=0", "device=cpu"] + [f"{k}={v}" for k, v in kw.items()]
    return build_cache(load_config(CacheConfig, None, over))


def test_poisoned_folder_goes_through_the_cacher(tmp_path, export, caplog):
    root, expected = make_poisoned_folder(tmp_path / "poison", size=32, good_per_class=4)
    out = cache(root, export, tmp_path / "lat")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == expected and meta["skipped_total"] == sum(expected.values())
    assert set(meta["converted"]) == CONVERTED  # odd modes are kept as RGB
    assert meta["num_samples"] == 2 * 4 + len(CONVERTED)
    ds = LatentDataset(out)
    assert len(ds) == meta["num_samples"] and ds.classes == ["class_00", "class_01"]
    assert torch.isfinite(ds.__getitems__(list(range(len(ds))))["tokens"]).all()


def test_poisoned_shards_go_through_the_cacher(tmp_path, export):
    shard, expected = make_poisoned_shard(tmp_path / "wds" / "shard-000000.tar", size=32, good=6)
    cut = tmp_path / "wds" / "shard-000001.tar"  # the same shard cut in the middle of a member
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 700])
    src = open_source(tmp_path / "wds", 32)
    assert src.scan_stats.skipped["truncated_shard"] == 1
    out = cache(tmp_path / "wds", export, tmp_path / "lat")
    meta = json.loads((out / "meta.json").read_text())
    for reason, n in expected.items():
        assert meta["skipped"][reason] >= n, reason
    assert meta["skipped"]["truncated_shard"] == 1
    assert set(meta["converted"]) == CONVERTED
    assert meta["classes"] == ["class_00", "class_01"]
    one = cache(shard, export, tmp_path / "lat1")  # the intact shard alone: exact counts
    meta1 = json.loads((one / "meta.json").read_text())
    assert meta1["skipped"] == expected and meta1["num_samples"] == 6 + len(CONVERTED)


def test_cache_shards_dtype_and_idempotence(tmp_path, export):
    root = make_image_folder(tmp_path / "imgs", num_classes=3, per_class=5, size=32)
    out = cache(root, export, tmp_path / "lat", shard_size=4, dtype="bfloat16")
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) == 4 and sum(s["n"] for s in meta["shards"]) == 15
    ds = LatentDataset(out)
    assert (ds.num_tokens, ds.channels) == (4, 64)
    idx = [14, 0, 7, 3, 3]
    batch = ds.__getitems__(idx)
    assert batch["tokens"].shape == (5, 4, 64) and batch["tokens"].dtype == torch.float32
    assert batch["labels"].tolist() == [ds.labels[i].item() for i in idx]
    torch.testing.assert_close(batch["tokens"][1], ds[0]["tokens"])
    torch.testing.assert_close(batch["tokens"][3], batch["tokens"][4])
    stamp = (out / "meta.json").stat().st_mtime_ns
    cache(root, export, tmp_path / "lat", shard_size=4, dtype="bfloat16")  # complete: not rebuilt
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    # a regenerated source (here: one class folder rewritten) rebuilds the cache with the new images

    shutil.rmtree(root / "class_01")
    make_image_folder(tmp_path / "other", num_classes=3, per_class=2, size=32)
    shutil.copytree(tmp_path / "other" / "class_01", root / "class_01")
    cache(root, export, tmp_path / "lat", shard_size=4, dtype="bfloat16")
    assert json.loads((out / "meta.json").read_text())["num_samples"] == 12


def test_normalizer_position_and_channel(tmp_path):
    z = torch.randn(500, 6, 4) * torch.arange(1, 5) + torch.arange(6)[:, None]
    sums = token_sums(z[:200])
    for part in (z[200:350], z[350:]):
        s = token_sums(part)
        sums = {k: sums[k] + s[k] for k in s}
    pos = Normalizer.from_sums(sums, "position", eps=0.0)
    torch.testing.assert_close(pos.mean, z.mean(0))
    torch.testing.assert_close(pos.std, z.std(0), rtol=1e-4, atol=1e-5)
    ch = Normalizer.from_sums(sums, "channel", eps=0.0)
    torch.testing.assert_close(ch.mean, z.reshape(-1, 4).mean(0))
    torch.testing.assert_close(ch.std, z.reshape(-1, 4).std(0), rtol=1e-4, atol=1e-5)
    x = pos.normalize(z)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    torch.testing.assert_close(pos.denormalize(x), z, rtol=1e-5, atol=1e-5)
    ch.save(tmp_path / "s.safetensors")
    back = Normalizer.load(tmp_path / "s.safetensors")
    assert back.kind == "channel" and torch.equal(back.std, ch.std)
    with pytest.raises(ValueError, match="unknown normalisation"):
        Normalizer.from_sums(sums, "batch")


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache-rae-latents"):
        LatentDataset(tmp_path)


def test_toyworld_poisoned_shard_through_the_cacher(tmp_path, export):
    """Issue 7's shard (ov3common.toyworld.poison): image defects are skipped with their reason, nothing crashes;
    its samples carry no class label (multi-object scenes, caption/json defects), so they count as no_label."""

    write_poisoned_shard(str(tmp_path / "wds" / "poison-000000.tar"), n_good=6, resolution=32)
    out = cache(tmp_path / "wds", export, tmp_path / "lat")
    meta = json.loads((out / "meta.json").read_text())
    image_reasons = {"truncated", "empty_file", "not_an_image", "bad_aspect", "too_small", "bad_json"}
    for reason in image_reasons:
        assert meta["skipped"][reason] == 1, reason
    unlabelled = len(BAD_KINDS) - len(image_reasons)  # odd modes (decoded fine) and caption defects
    assert unlabelled <= meta["skipped"]["no_label"] <= unlabelled + 6
    assert meta["num_samples"] + meta["skipped_total"] == 6 + len(BAD_KINDS)
