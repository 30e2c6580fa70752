"""Frozen VAE: OV3 latent convention, FLUX single-file layout conversion, local-only loading, errors."""

import re

import pytest
import torch
from safetensors.torch import save_file

from encoder.vae import (
    FLUX_VAE_CONFIG,
    FrozenVAE,
    build_random_vae,
    load_frozen_vae,
    tiny_vae_config,
)


def to_flux_layout(sd: dict, n_blocks: int) -> dict:
    """Independent inverse mapping: diffusers AutoencoderKL keys → original FLUX ``ae.safetensors`` keys."""
    out = {}
    for k, v in sd.items():
        o = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        o = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", o)
        o = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", o)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", o)
        if m:
            i = n_blocks - 1 - int(m.group(1))
            o = f"decoder.up.{i}.block.{m.group(3)}" if m.group(2) == "resnets" else f"decoder.up.{i}.upsample.{m.group(3)}"
        o = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda mm: f"mid.block_{int(mm.group(1)) + 1}.", o)
        if "mid_block.attentions.0." in o:
            o = o.replace("mid_block.attentions.0.", "mid.attn_1.")
            o = (o.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
            if v.ndim == 2:
                v = v[:, :, None, None]  # FLUX stores attention projections as 1×1 convs
        out[o] = v.clone()
    return out


@pytest.fixture(scope="module")
def tiny_vae():
    return build_random_vae(tiny_vae_config(), seed=1)


def test_encode_is_scaled_posterior_mean_without_shift(tiny_vae):
    fv = FrozenVAE(tiny_vae, scaling_factor=0.3611)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = fv.encode(x)
    ref = tiny_vae.encode(x).latent_dist.mean * 0.3611
    assert z.shape == (2, 16, 4, 4) and torch.allclose(z, ref) and not z.requires_grad
    assert fv.downsample == 8 and not fv.training
    fv.train()
    assert not fv.vae.training  # stays frozen in eval
    assert all(not p.requires_grad for p in fv.parameters())


def test_decode_is_differentiable_wrt_latents(tiny_vae):
    fv = FrozenVAE(tiny_vae, scaling_factor=0.5)
    z = torch.randn(1, 16, 4, 4, requires_grad=True)
    img = fv.decode(z)
    assert img.shape == (1, 3, 32, 32)
    img.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in fv.parameters())
    assert torch.allclose(img, tiny_vae.decode(z / 0.5).sample)


def test_flux_single_file_layout_loads(tmp_path, tiny_vae):
    cfg = tiny_vae_config()
    flux_sd = to_flux_layout(tiny_vae.state_dict(), len(cfg["block_out_channels"]))
    assert any(k.startswith("encoder.down.0.block.0.") for k in flux_sd)
    assert "encoder.mid.attn_1.q.weight" in flux_sd and flux_sd["encoder.mid.attn_1.q.weight"].ndim == 4
    path = tmp_path / "ae.safetensors"
    save_file(flux_sd, str(path))
    fv = load_frozen_vae(path, config=cfg, scaling_factor=0.3611)
    loaded = fv.vae.state_dict()
    ref = tiny_vae.state_dict()
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(fv.encode(x), tiny_vae.encode(x).latent_dist.mean * 0.3611)


def test_diffusers_folder_and_defaults(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    fv = load_frozen_vae(tmp_path / "pipe")  # pipeline folder with a vae/ subfolder
    assert fv.scaling_factor == tiny_vae.config.scaling_factor and fv.shift_factor == 0.0


def test_flux_defaults():
    assert FLUX_VAE_CONFIG["latent_channels"] == 16 and FLUX_VAE_CONFIG["scaling_factor"] == 0.3611
    with torch.device("meta"):
        fv = FrozenVAE(build_random_vae(FLUX_VAE_CONFIG))
    assert fv.scaling_factor == 0.3611 and fv.shift_factor == 0.0 and fv.downsample == 8


def test_errors(tmp_path, tiny_vae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_frozen_vae(tmp_path / "nope")
    (tmp_path / "ae.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_frozen_vae(tmp_path / "ae.bin")
    sd = to_flux_layout(tiny_vae.state_dict(), 4)
    sd.pop("decoder.conv_out.weight")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="decoder.conv_out.weight"):
        load_frozen_vae(tmp_path / "bad.safetensors", config=tiny_vae_config())
