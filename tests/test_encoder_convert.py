"""Official open_clip-layout checkpoint → our ViT: real B/2 shapes, every key maps, output = reference forward."""

import json

import pytest
import torch
import torch.nn.functional as F

from encoder.convert import build_converted_vit, load_open_clip_checkpoint

B2 = dict(width=768, layers=12, heads=12, patch=2, in_ch=16, grid=16, embed=768)


def open_clip_state_dict(width, layers, patch, in_ch, grid, embed, heads=None, seed=0, text=True):
    """Random tensors with exactly the open_clip VisionTransformer key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.02: torch.randn(*s, generator=g) * std
    sd = {
        "visual.conv1.weight": r(width, in_ch, patch, patch, std=0.1),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + r(width, std=0.1), "visual.ln_pre.bias": r(width, std=0.1),
        "visual.ln_post.weight": 1 + r(width, std=0.1), "visual.ln_post.bias": r(width, std=0.1),
        "visual.proj": r(width, embed),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(width, std=0.1), p + "ln_1.bias": r(width, std=0.1),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width, std=0.1), p + "ln_2.bias": r(width, std=0.1),
            p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        })
    if text:
        sd.update({"logit_scale": torch.tensor(4.6), "token_embedding.weight": r(10, 8)})
    return sd


def reference_forward(sd, latents, heads, layers):
    """Independent functional forward of open_clip's VisionTransformer (torch's own MHA kernel)."""
    w = sd["visual.conv1.weight"]
    x = F.conv2d(latents, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], sd[f"visual.{n}.weight"], sd[f"visual.{n}.bias"], 1e-5)
    x = ln(x, "ln_pre")
    d = x.shape[-1]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        y = ln(x, p + "ln_1").transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            y, y, y, d, heads, sd[f"visual.{p}attn.in_proj_weight"], sd[f"visual.{p}attn.in_proj_bias"],
            None, None, False, 0.0, sd[f"visual.{p}attn.out_proj.weight"], sd[f"visual.{p}attn.out_proj.bias"],
            training=False, need_weights=False)
        x = x + a.transpose(0, 1)
        y = F.linear(ln(x, p + "ln_2"), sd[f"visual.{p}mlp.c_fc.weight"], sd[f"visual.{p}mlp.c_fc.bias"])
        x = x + F.linear(F.gelu(y), sd[f"visual.{p}mlp.c_proj.weight"], sd[f"visual.{p}mlp.c_proj.bias"])
    x = ln(x, "ln_post")
    return x[:, 1:], x[:, 0] @ sd["visual.proj"]


def oc_config(width, layers, patch, grid, embed):
    return {"model_cfg": {"embed_dim": embed, "vision_cfg": {"image_size": grid * patch * 8, "layers": layers,
                                                               "width": width, "patch_size": patch, "head_width": 64},
                          "text_cfg": {"width": 8}}}


def test_real_b2_shapes_every_key_maps_and_matches_reference():
    sd = open_clip_state_dict(B2["width"], B2["layers"], B2["patch"], B2["in_ch"], B2["grid"], B2["embed"])
    cfg = oc_config(B2["width"], B2["layers"], B2["patch"], B2["grid"], B2["embed"])
    vit, image_size, skipped = build_converted_vit(cfg, sd)  # strict: raises on missing/unexpected
    assert sorted(skipped) == ["logit_scale", "token_embedding.weight"]
    assert image_size == 256 and vit.cfg.heads == 12 and vit.cfg.depth == 12 and vit.cfg.grid_size == 16
    n_visual = sum(v.numel() for k, v in sd.items() if k.startswith("visual."))
    assert n_visual == sum(p.numel() for p in vit.parameters())  # nothing left over on either side
    lat = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        tok, pooled = vit(lat)
        ref_tok, ref_pooled = reference_forward(sd, lat, 12, 12)
    assert tok.shape == (1, 256, 768) and pooled.shape == (1, 768)
    assert torch.allclose(tok, ref_tok, atol=1e-4, rtol=1e-4)
    assert torch.allclose(pooled, ref_pooled, atol=1e-4, rtol=1e-4)


def test_file_loading_and_errors(tmp_path):
    sd = open_clip_state_dict(64, 2, 2, 16, 4, 32, seed=1)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(oc_config(64, 2, 2, 4, 32)))
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    cfg, loaded = load_open_clip_checkpoint(tmp_path)
    vit, _, _ = build_converted_vit(cfg, loaded)
    lat = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        tok, pooled = vit(lat)
        rt, rp = reference_forward(sd, lat, 1, 2)
    assert torch.allclose(tok, rt, atol=1e-5) and torch.allclose(pooled, rp, atol=1e-5)
    bad = dict(sd)
    bad["visual.attn_pool.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="visual.attn_pool.weight"):
        build_converted_vit(cfg, bad)
    bad = dict(sd)
    bad.pop("visual.ln_pre.bias")
    with pytest.raises(KeyError, match="norm_pre.bias"):
        build_converted_vit(cfg, bad)
    (tmp_path / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        load_open_clip_checkpoint(tmp_path)


def test_convert_cli_writes_export_without_decoder(tmp_path):
    from encoder.convert import main
    from encoder.export import load_encoder
    from encoder.vae import build_random_vae, tiny_vae_config

    ck = tmp_path / "ck"
    ck.mkdir()
    sd = open_clip_state_dict(64, 2, 2, 16, 4, 32, seed=2)
    (ck / "open_clip_config.json").write_text(json.dumps(oc_config(64, 2, 2, 4, 32)))
    from safetensors.torch import save_file

    save_file(sd, str(ck / "open_clip_model.safetensors"))
    build_random_vae(tiny_vae_config()).save_pretrained(str(tmp_path / "vae"))
    main(["--checkpoint", str(ck), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "exp")])
    enc = load_encoder(tmp_path / "exp")
    assert enc.image_size == 64 and enc.num_tokens == 16 and enc.vae.scaling_factor == 0.3611
    tok, pooled = enc.encode(torch.zeros(1, 3, 64, 64))
    assert tok.shape == (1, 16, 64) and pooled.shape == (1, 32)
    with pytest.raises(RuntimeError, match="no ViT decoder"):
        enc.decode(tok)
