"""ViT encoder / decoder: shapes per registered size, position embedding, checkpointing, layer selection."""

import math

import pytest
import torch

from encoder.models import (
    VIT_SIZES,
    LatentViT,
    ViTConfig,
    ViTDecoder,
    count_params,
    decoder_config_for,
    sincos_2d,
    vit_config,
)


@pytest.mark.parametrize("size", ["tiny", "toy"])
def test_shapes_small_sizes(size):
    torch.manual_seed(0)
    cfg = vit_config(size)
    vit, dec = LatentViT(cfg), ViTDecoder(decoder_config_for(cfg))
    lat = torch.randn(2, 16, 16, 16)  # 128 px image → 16×16×16 latent → 8×8 = 64 tokens
    tok, pooled = vit(lat)
    assert tok.shape == (2, 64, cfg.width) and pooled.shape == (2, cfg.embed_dim)
    # z_u: LayerNorm without affine → zero mean, unit std per token
    assert torch.allclose(tok.mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(tok.std(-1, unbiased=False), torch.ones(2, 64), atol=1e-3)
    assert dec(tok).shape == lat.shape


@pytest.mark.parametrize("size,params_m", [("S/2", 21.7), ("B/2", 86.0), ("L/2", 303.5)])
def test_registry_param_counts(size, params_m):
    """Real sizes built on the meta device: parameter counts match the paper scale (B ~86M, L ~302M)."""
    with torch.device("meta"):
        vit = LatentViT(vit_config(size))
    assert abs(count_params(vit) / 1e6 - params_m) < 1.5, count_params(vit)
    assert VIT_SIZES[size]["width"] % VIT_SIZES[size]["heads"] == 0


def test_sincos_is_fixed_and_resolution_free():
    emb = sincos_2d(64, 4, 6)
    assert emb.shape == (24, 64)
    # rows share the first half, columns share the second half
    assert torch.equal(emb[0, :32], emb[5, :32]) and not torch.equal(emb[0, 32:], emb[5, 32:])
    assert torch.equal(emb[0, 32:], emb[6, 32:])
    vit = LatentViT(vit_config("tiny"))
    assert vit(torch.randn(1, 16, 8, 12))[0].shape == (1, 24, 64)  # non-square, other resolution
    assert not any("pos" in k for k in vit.state_dict())  # nothing learned / stored


def test_gradient_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    vit = LatentViT(vit_config("tiny"))
    lat = torch.randn(2, 16, 8, 8)
    outs, grads = [], []
    for ck in (False, True):
        vit.grad_checkpointing = ck
        vit.zero_grad()
        tok, pooled = vit(lat)
        (tok.square().mean() + pooled.sum()).backward()
        outs.append(tok.detach())
        grads.append(vit.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_forward_features_layers():
    torch.manual_seed(0)
    vit = LatentViT(vit_config("tiny", depth=3))
    lat = torch.randn(1, 16, 8, 8)
    assert torch.equal(vit.forward_features(lat, -1), vit(lat)[0])
    x = vit.embed(lat)
    hs = []
    for blk in vit.blocks:
        x = blk(x)
        hs.append(x)
    assert torch.allclose(vit.forward_features(lat, 0), hs[0], atol=1e-6)
    assert torch.allclose(vit.forward_features(lat, -2), hs[1], atol=1e-6)
    assert torch.allclose(vit.forward_features(lat, 2), hs[2], atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        vit.forward_features(lat, 3)


def test_decoder_unpatchify_layout():
    """Token (i, j) writes exactly latent pixels [2i:2i+2, 2j:2j+2] (no mixing between tokens)."""
    enc = vit_config("tiny", depth=1)
    dec = ViTDecoder(decoder_config_for(enc, depth=0))
    n = 16
    out_lin = dec.out
    torch.nn.init.zeros_(out_lin.weight)
    with torch.no_grad():
        out_lin.bias.copy_(torch.arange(out_lin.out_features, dtype=torch.float32))
    lat = dec(torch.randn(1, n, enc.width))
    assert lat.shape == (1, 16, 8, 8)
    # bias index = (py*2 + px)*C + c
    for py in range(2):
        for px in range(2):
            assert torch.equal(lat[0, :, py::2, px::2][:, 0, 0], torch.arange(16) + (py * 2 + px) * 16.0)


def test_open_clip_style_switches():
    cfg = ViTConfig(width=64, depth=1, heads=2, embed_dim=32, pos_embed="learned", grid_size=4, class_token=True,
                    norm_pre=True, pool="cls", final_norm_affine=True, proj_bias=False, patch_bias=False)
    vit = LatentViT(cfg)
    tok, pooled = vit(torch.randn(2, 16, 8, 8))
    assert tok.shape == (2, 16, 64) and pooled.shape == (2, 32)
    assert vit.pos_embed.shape == (1, 17, 64)
    with pytest.raises(ValueError, match="trained resolution"):
        vit(torch.randn(1, 16, 12, 12))
    assert math.isclose(float(vit.final_norm.weight.detach().mean()), 1.0)
