"""Export folder contract (docs/design.md §5): export → load → identical outputs; clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from encoder.convert import load_open_clip_visual
from encoder.export import export_encoder, load_encoder, main, write_random_export
from encoder.models import LatentViT, ViTDecoder, decoder_config_for, vit_config
from encoder.ov3 import VIT_LAYOUTS
from encoder.train import train
from encoder.vae import FrozenVAE, build_random_vae, tiny_vae_config
from tests.test_encoder_train import (
    cfg_for,
    stages,
    toy_root,  # noqa: F401, F811 (pytest fixture)
)


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    return write_random_export(tmp_path_factory.mktemp("exp") / "export", size="tiny", image_size=64, seed=0)


def test_random_export_contract(random_export):
    enc = load_encoder(random_export)
    assert (random_export / "config.json").is_file() and (random_export / "vae" / "config.json").is_file()
    assert enc.width == 64 and enc.embed_dim == 64 and enc.image_size == 64
    assert enc.grid_size == 4 and enc.num_tokens == 16 and enc.config["tau"] == 0.8
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    tok, pooled = enc.encode(x)
    assert tok.shape == (3, 16, 64) and pooled.shape == (3, 64) and not tok.requires_grad
    assert torch.equal(enc.forward_features(x, -1), tok)
    assert enc.forward_features(x, -2).shape == (3, 16, 64)
    img = enc.decode(tok)
    assert img.shape == (3, 3, 64, 64) and img.min() >= -1 and img.max() <= 1
    assert enc.decode_latents(tok).shape == (3, 16, 8, 8)
    # other resolutions work (sin-cos position embedding)
    assert enc.encode(torch.zeros(1, 3, 32, 48))[0].shape == (1, 6, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        enc.encode(torch.zeros(1, 3, 40, 40))
    enc.train()
    assert not enc.training


def test_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    vae = FrozenVAE(build_random_vae(tiny_vae_config(), seed=3), scaling_factor=0.3611)
    vcfg = vit_config("tiny", depth=3)
    vit, dec = LatentViT(vcfg), ViTDecoder(decoder_config_for(vcfg, depth=1))
    vit.eval(), dec.eval()
    out = export_encoder(tmp_path / "e", vit, dec, vae, image_size=32, tau=0.4)
    enc = load_encoder(out)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(x)
        ref_tok, ref_pool = vit(lat)
        ref_img = vae.decode(dec(ref_tok)).clamp(-1, 1)
        ref_l1 = vit.forward_features(lat, 1)
    tok, pool = enc.encode(x)
    assert torch.equal(tok, ref_tok) and torch.equal(pool, ref_pool)
    assert torch.equal(enc.decode(tok), ref_img)
    assert torch.equal(enc.forward_features(x, 1), ref_l1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vae"]["scaling_factor"] == 0.3611 and cfg["vae"]["shift_factor"] == 0.0
    assert cfg["tau"] == 0.4 and cfg["grid_size"] == 2 and cfg["patch_size"] == 2
    # re-export over an existing folder replaces it atomically
    export_encoder(out, vit, dec, vae, image_size=32, tau=0.0)
    assert load_encoder(out).tau == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_referenced_vae_and_bf16(tmp_path):
    torch.manual_seed(0)
    raw = build_random_vae(tiny_vae_config(), seed=4)
    raw.save_pretrained(str(tmp_path / "myvae"))
    vae = FrozenVAE(raw)
    vcfg = vit_config("tiny")
    out = export_encoder(tmp_path / "e", LatentViT(vcfg), ViTDecoder(decoder_config_for(vcfg)), vae, 64, 0.8,
                         copy_vae=False, vae_source=str(tmp_path / "myvae"))
    assert not (out / "vae").exists()
    enc = load_encoder(out, dtype=torch.bfloat16)
    tok, pooled = enc.encode(torch.zeros(1, 3, 64, 64))
    assert tok.dtype == torch.bfloat16 and pooled.shape == (1, 64)


def test_clear_errors(tmp_path, random_export):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_encoder(tmp_path / "nothing")

    bad = tmp_path / "bad"
    shutil.copytree(random_export, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_encoder(bad)
    shutil.rmtree(bad)
    shutil.copytree(random_export, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["encoder"]["depth"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"missing keys \['blocks.2"):
        load_encoder(bad)
    cfg["encoder"]["depth"] = 2
    cfg["vae"]["path"] = "elsewhere"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="vae.path"):
        load_encoder(bad)


# ----------------------------------------------------------------------------- the open_clip layout (issue 13)
def _open_clip_layout_export(tmp_path):
    torch.manual_seed(0)
    vae = FrozenVAE(build_random_vae(tiny_vae_config(), seed=3), scaling_factor=0.3611)
    vcfg = vit_config("tiny", **VIT_LAYOUTS["open_clip"])
    vit, dec = LatentViT(vcfg), ViTDecoder(decoder_config_for(vcfg))
    with torch.no_grad():  # a trained-looking head: not the init's ones/zeros
        vit.final_norm.weight.normal_(1, 0.1)
        vit.final_norm.bias.normal_(0, 0.1)
    return export_encoder(tmp_path / "e", vit.eval(), dec.eval(), vae, image_size=64, tau=0.8)


def test_open_clip_cli_writes_the_visual_tower(tmp_path):
    pytest.importorskip("open_clip")

    exp = _open_clip_layout_export(tmp_path)
    main(["--open-clip", str(tmp_path / "oc"), "--encoder", str(exp)])
    cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    vc = cfg["model_cfg"]["vision_cfg"]
    assert vc["image_size"] == 8 and vc["in_channels"] == 16 and vc["pool_type"] == "avg" and vc["no_ln_pre"]
    meta = cfg["openvision3"]
    assert meta["image_size"] == 64 and meta["vae"]["scaling_factor"] == 0.3611 and meta["tau"] == 0.8
    assert meta["text_tower"].startswith("left out") and meta["decoder"].startswith("left out")
    assert Path(meta["vae"]["path"]).is_dir()
    enc, visual = load_encoder(exp), load_open_clip_visual(tmp_path / "oc")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok, pooled = enc.encode(x)
    with torch.no_grad():
        ref_pooled, ref_tok = visual(enc.encode_latents(x))
    assert (tok - ref_tok).abs().max() < 1e-5 and (pooled - ref_pooled).abs().max() < 1e-5


def test_open_clip_cli_refuses_our_default_layout(tmp_path, random_export):
    with pytest.raises(SystemExit, match="class_token=False"):
        main(["--open-clip", str(tmp_path / "oc"), "--encoder", str(random_export)])
    assert not (tmp_path / "oc").exists()
    with pytest.raises(SystemExit):
        main(["--open-clip", str(tmp_path / "oc")])  # neither --encoder nor --run


def test_train_in_the_open_clip_layout_then_export_the_run(toy_root, tmp_path):  # noqa: F811
    pytest.importorskip("open_clip")

    run = tmp_path / "run"
    train(cfg_for(toy_root, run, stages((32, 3, 8)), "model.layout=open_clip"))
    main(["--open-clip", str(tmp_path / "oc"), "--run", str(run)])
    enc, visual = load_encoder(run / "export"), load_open_clip_visual(tmp_path / "oc")
    assert enc.vit.cfg.class_token and enc.vit.cfg.final_ln_after_pool
    lat = torch.randn(2, 16, 4, 4)
    tok, pooled = enc.encode_from_latents(lat)
    with torch.no_grad():
        ref_pooled, ref_tok = visual(lat)
    assert (tok - ref_tok).abs().max() < 1e-5 and (pooled - ref_pooled).abs().max() < 1e-5
