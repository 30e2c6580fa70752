"""data.feature_cache: cached tower features give the same loss as the tower; stale caches are rebuilt; images that
cannot be read are recorded and skipped."""

import json
import shutil

import torch

from llava_bridge.config import LlavaTrainConfig
from llava_bridge.data import Collator, LlavaDataset
from llava_bridge.feature_cache import FeatureCache, build_feature_cache
from llava_bridge.model import MMSettings, attach_vision, load_lm, load_tokenizer
from llava_bridge.train import build
from llava_bridge.vision import build_vision_tower
from ov3common.config import load_config
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.test_llava_model import overrides


def test_cached_features_match_the_tower(llava_world, tmp_path):
    w = llava_world
    tower = build_vision_tower(w["enc"], -2, "patch")
    tok = load_tokenizer(w["llm"], 128)
    model = load_lm(w["llm"])
    attach_vision(model, tower, MMSettings(str(w["enc"]), -2, "patch", "mlp2x_gelu", "pad", 128, "vicuna_v1"))
    args = ([str(w["instruct"])], str(w["images"]), tok, "vicuna_v1", tower.processor, 128, tower.num_tokens)
    plain = LlavaDataset(*args)
    images = [img for _, img, _ in plain.items if img is not None]
    cache = build_feature_cache(tower, images, tmp_path / "cache", dtype="float32")
    cached = LlavaDataset(*args, features=cache)
    coll = Collator(tok.pad_token_id)
    a, b = coll([plain[i] for i in range(4)]), coll([cached[i] for i in range(4)])
    assert "images" in a and "image_features" in b and "images" not in b
    model.eval()
    with torch.no_grad():
        la = model(**{k: v for k, v in a.items() if not k.startswith("_")}).loss
        lb = model(**{k: v for k, v in b.items() if not k.startswith("_")}).loss
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert len(cache) == len(set(map(str, images)))


def test_stale_cache_is_rebuilt_and_bad_images_are_skipped(llava_world, tmp_path):
    w = llava_world
    images = tmp_path / "images"
    shutil.copytree(w["images"], images)
    (images / "img1.png").write_bytes(b"not a png")
    tower = build_vision_tower(w["enc"], -2, "patch")
    paths = sorted(images.glob("*.png"))
    cache = build_feature_cache(tower, paths[:3], tmp_path / "cache")
    assert str(images / "img1.png") in cache.bad and len(cache) == 2
    grown = build_feature_cache(tower, paths, tmp_path / "cache")  # adds the missing ones, keeps the rows
    assert len(grown) == len(paths) - 1 and torch.equal(grown[paths[0]], cache[paths[0]])
    other = build_vision_tower(w["enc"], -1, "patch")  # another layer: another fingerprint -> rebuilt
    rebuilt = build_feature_cache(other, paths[:2], tmp_path / "cache")
    assert rebuilt.fingerprint != cache.fingerprint and len(rebuilt) == 1
    meta = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert set(meta["bad"]) == {str(images / "img1.png")}


def test_training_with_a_feature_cache(llava_world, tmp_path):
    cfg = load_config(LlavaTrainConfig, overrides=overrides(llava_world, tmp_path / "run", **{
        "data.feature_cache": tmp_path / "feats", "train.max_steps": 2}))
    trainer, _ = build(cfg)
    assert isinstance(trainer.train_dataset.features, FeatureCache)
    trainer.train()
    assert (tmp_path / "feats" / "features.safetensors").is_file()
    assert trainer.state.global_step == 2
