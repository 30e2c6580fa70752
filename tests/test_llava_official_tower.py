"""The LLaVA bridge takes a converted official (open_clip layout, OV3 release options) checkpoint as its frozen
tower: its features are open_clip's own intermediates, and stage 1 trains through it."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("open_clip")

from encoder.export import main as convert
from encoder.vae import build_random_vae, tiny_vae_config
from llava_bridge.model import load_llava  # noqa: E402
from llava_bridge.train import main  # noqa: E402
from llava_bridge.vision import build_vision_tower  # noqa: E402
from tests.llava_fixtures import *  # noqa: E402, F403 (pytest fixtures)
from tests.test_encoder_convert import oc_config, reference  # noqa: E402
from tests.test_llava_model import overrides  # noqa: E402


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout checkpoint (no ln_pre, avg pool, LN after pool, eps 1e-6, 16 channels; 32 px images →
    a 4×4 latent → 2×2 tokens) converted by ``python -m encoder.export --from-open-clip`` with a tiny VAE."""

    d = tmp_path_factory.mktemp("official")
    oc = oc_config(image_size=4, no_ln_pre=True, pool_type="avg", final_ln_after_pool=True,
                   norm_kwargs={"eps": 1e-6})
    ref, sd = reference(oc, seed=4)
    (d / "ck").mkdir()
    (d / "ck" / "open_clip_config.json").write_text(json.dumps(oc))
    save_file(sd, str(d / "ck" / "open_clip_model.safetensors"))
    build_random_vae(tiny_vae_config()).save_pretrained(str(d / "vae"))
    convert(["--from-open-clip", str(d / "ck"), "--vae", str(d / "vae"), "--out", str(d / "export")])
    return d / "export", ref


def test_official_tower_features_are_open_clips(official):
    export, ref = official
    img = Image.new("RGB", (40, 32), (200, 40, 10))
    for layer in (-2, -1):
        tower = build_vision_tower(export, layer, "patch")
        assert tower.image_size == 32 and tower.num_tokens == 4 and tower.hidden_size == 64
        pix = tower.processor(img)[None]
        feats = tower(pix)
        lat = tower.encoder.encode_latents(pix)
        with torch.no_grad():
            if layer == -2:  # LLaVA's mm_vision_select_layer -2: the penultimate block, class token dropped
                want = ref.forward_intermediates(lat, indices=[0], output_fmt="NLC",
                                                 intermediates_only=True)["image_intermediates"][0]
            else:
                want = ref(lat)[1]  # open_clip's output tokens (un-normed: final_ln_after_pool)
        assert feats.shape == (1, 4, 64) and (feats - want).abs().max() < 1e-5


def test_stage1_trains_through_the_official_tower(llava_world, official, tmp_path):
    export, _ = official
    assert main(overrides(llava_world, tmp_path, **{"model.vision_tower": export, "train.max_steps": 2})) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mm_hidden_size"] == 64
    model, _ = load_llava(tmp_path)
    assert model.vision_tower.kind == "ov3" and model.vision_tower.encoder.decoder is None
