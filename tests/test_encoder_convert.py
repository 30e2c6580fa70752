"""open_clip layout ⇄ our ViT, checked against open_clip 3.3.0 itself (its ``_build_vision_tower`` /
``VisionTransformer``): the UCSC-VLAA layout grid, more options, refusals by name, and the way back."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("open_clip")  # dev extra: open_clip_torch==3.3.0

from pathlib import Path

from encoder.convert import (  # noqa: E402
    build_converted_vit,
    load_open_clip_checkpoint,
    load_open_clip_visual,
    open_clip_from_vit,
    open_clip_visual,
    vit_config_from_open_clip,
)
from encoder.export import (
    export_open_clip,  # noqa: E402
    load_encoder,
    main,
)
from encoder.models import LatentViT, vit_config  # noqa: E402
from encoder.vae import build_random_vae, tiny_vae_config

TOL = 1e-5


def oc_config(embed_dim=32, quick_gelu=False, **vision):
    vc = dict(image_size=8, layers=2, width=64, head_width=32, patch_size=2, in_channels=16, output_tokens=True)
    vc.update(vision)
    return {"model_cfg": {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vc},
            "preprocess_cfg": {}}


def randomize(module, seed=0, std=0.1):
    """Every parameter random (LayerNorm weights around 1), so no mapping error hides behind an init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module.eval()


def reference(oc, seed=0, std=0.1):
    """open_clip's tower with random weights and its state dict under ``visual.``."""
    ref = randomize(open_clip_visual(oc), seed, std)
    return ref, {f"visual.{k}": v.clone() for k, v in ref.state_dict().items()}


def max_diff(a, b):
    return (a - b).abs().max().item()


GRID = list(itertools.product([True, False], ["tok", "avg"], [False, True], [1e-5, 1e-6]))


@pytest.mark.parametrize("ln_pre,pool,after,eps", GRID)
def test_layout_grid_matches_open_clip_and_round_trips(ln_pre, pool, after, eps, tmp_path):
    oc = oc_config(no_ln_pre=not ln_pre, pool_type=pool, final_ln_after_pool=after, norm_kwargs={"eps": eps})
    ref, sd = reference(oc)
    conv = build_converted_vit(oc, sd)
    assert conv.input_size == 8 and conv.vit.cfg.norm_eps == eps and conv.vit.cfg.norm_pre == ln_pre
    assert ("visual.ln_pre.weight" in sd) == ln_pre
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        ref_pooled, ref_tokens = ref(x)
        tokens, pooled = conv.vit(x)
    assert tokens.shape == (3, 16, 64) and pooled.shape == (3, 32)
    assert max_diff(tokens, ref_tokens) < TOL and max_diff(pooled, ref_pooled) < TOL
    # the way back: our export → open_clip's VisionTransformer loads it strictly → the same outputs
    out = export_open_clip(tmp_path / "oc", conv.vit, image_size=64, downsample=8)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    back = load_open_clip_visual(out)  # strict load_state_dict inside
    with torch.no_grad():
        back_pooled, back_tokens = back(x)
    assert max_diff(back_tokens, ref_tokens) < TOL and max_diff(back_pooled, ref_pooled) < TOL
    written = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert written["no_ln_pre"] == (not ln_pre) and written["pool_type"] == pool
    assert written["final_ln_after_pool"] == after and written["norm_kwargs"] == {"eps": eps}
    again = build_converted_vit(*load_open_clip_checkpoint(out))
    assert all(torch.equal(a, b) for a, b in zip(again.vit.state_dict().values(), conv.vit.state_dict().values()))


def test_eps_and_ln_pre_are_read_not_assumed():
    """The grid above would notice a hard-coded eps or ln_pre: both change the outputs beyond the tolerance."""
    oc = oc_config(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True, norm_kwargs={"eps": 1e-6})
    ref, sd = reference(oc)
    x = torch.randn(2, 16, 8, 8) * 0.05  # small activations: the LayerNorm eps matters
    wrong = json.loads(json.dumps(oc))
    wrong["model_cfg"]["vision_cfg"]["norm_kwargs"] = {"eps": 1e-5}
    with torch.no_grad():
        ref_pooled, ref_tokens = ref(x)
        ok = build_converted_vit(oc, sd).vit(x)
        bad = build_converted_vit(wrong, sd).vit(x)
    assert max_diff(ok[0], ref_tokens) < TOL and max_diff(ok[1], ref_pooled) < TOL
    assert max_diff(bad[1], ref_pooled) > 10 * TOL


@pytest.mark.parametrize("name,vision,model", [
    ("pool none", dict(pool_type="none"), {}),
    ("pool none + final LN after pool", dict(pool_type="none", final_ln_after_pool=True), {}),
    ("sin-cos positions", dict(pos_embed_type="sin_cos_2d"), {}),
    ("quick_gelu", {}, dict(quick_gelu=True)),
    ("gelu tanh", dict(act_kwargs={"approximate": "tanh"}), {}),
    ("RGB tower, in_channels absent", dict(in_channels=None, image_size=16, patch_size=4), {}),
    ("square image_size list, grid 8", dict(image_size=[16, 16]), {}),
    ("So400m-style mlp_ratio", dict(mlp_ratio=3.7362, width=96, head_width=48), dict(embed_dim=48)),
    ("inert training options", dict(patch_dropout=0.5, output_tokens=False, attn_pooler_heads=4), {}),
])
def test_more_layouts_match_open_clip(name, vision, model):
    oc = oc_config(**{k: v for k, v in model.items() if k != "quick_gelu"}, quick_gelu=model.get("quick_gelu", False),
                   **{k: v for k, v in vision.items() if v is not None})
    if vision.get("in_channels", 16) is None:
        oc["model_cfg"]["vision_cfg"].pop("in_channels")
    vc = oc["model_cfg"]["vision_cfg"]
    ref, sd = reference(oc, seed=3)
    conv = build_converted_vit(oc, sd)
    side = vc["image_size"][0] if isinstance(vc["image_size"], list) else vc["image_size"]
    x = torch.randn(2, vc.get("in_channels", 3), side, side)
    ref.output_tokens = True
    with torch.no_grad():
        ref_pooled, ref_tokens = ref(x)
        tokens, pooled = conv.vit(x)
    if vc.get("pool_type") == "none":  # open_clip: pooled and tokens are every token, the class token included
        assert pooled.shape == ref_pooled.shape and tokens.shape[1] == ref_tokens.shape[1] - 1
        ref_tokens = ref_tokens[:, 1:]
    assert max_diff(tokens, ref_tokens) < TOL and max_diff(pooled, ref_pooled) < TOL
    if "patch_dropout" in vc:
        assert any("patch_dropout=0.5" in n for n in conv.notes) and any("attn_pooler_heads" in n for n in conv.notes)
    if "in_channels" not in vc:
        assert any("in_channels absent: 3" in n for n in conv.notes)


def test_real_b2_release_layout():
    """OV3 B/2 at 256 px as released: latent side 32, patch 2, 16 channels, no ln_pre, avg pool, LN after pool."""
    oc = oc_config(embed_dim=768, image_size=32, layers=12, width=768, head_width=64, no_ln_pre=True,
                   pool_type="avg", final_ln_after_pool=True, norm_kwargs={"eps": 1e-6})
    ref, sd = reference(oc, std=0.02)
    conv = build_converted_vit(oc, sd)
    n_visual = sum(v.numel() for v in sd.values())
    assert n_visual == sum(p.numel() for p in conv.vit.parameters())  # nothing left over on either side
    assert conv.vit.cfg.grid_size == 16 and conv.vit.cfg.heads == 12
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        ref_pooled, ref_tokens = ref(x)
        tokens, pooled = conv.vit(x)
    assert tokens.shape == (1, 256, 768)  # raw last-block tokens (final_ln_after_pool): compare relatively
    assert max_diff(tokens, ref_tokens) < TOL * ref_tokens.abs().max() and max_diff(pooled, ref_pooled) < TOL


def test_no_class_token_and_jax_export_biases():
    """A state dict without class token (positions for the grid only) and with OpenVision's JAX-export extras
    ``visual.conv1.bias`` / ``visual.proj_bias``: checked against open_clip's own modules."""
    oc = oc_config(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True, norm_kwargs={"eps": 1e-6})
    ref, sd = reference(oc, seed=5)
    g = torch.Generator().manual_seed(9)
    conv_b, proj_b = torch.randn(64, generator=g) * 0.1, torch.randn(32, generator=g) * 0.1
    jax = {**sd, "visual.conv1.bias": conv_b, "visual.proj_bias": proj_b}
    conv = build_converted_vit(oc, jax)
    assert conv.vit.cfg.patch_bias and conv.vit.cfg.proj_bias
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref.positional_embedding[1:] += conv_b  # a conv bias is a shift of every patch position
        ref_pooled, ref_tokens = ref(x)
        tokens, pooled = conv.vit(x)
    assert max_diff(tokens, ref_tokens) < TOL and max_diff(pooled, ref_pooled + proj_b) < TOL

    no_cls = {k: v for k, v in sd.items() if k != "visual.class_embedding"}
    no_cls["visual.positional_embedding"] = sd["visual.positional_embedding"][1:]
    conv = build_converted_vit(oc, no_cls)
    assert not conv.vit.cfg.class_token and any("no visual.class_embedding" in n for n in conv.notes)
    with torch.no_grad():
        seq = ref.conv1(x).flatten(2).transpose(1, 2) + no_cls["visual.positional_embedding"]
        seq = ref.transformer(ref.ln_pre(seq))
        ref_pooled = ref.ln_post(seq.mean(1)) @ ref.proj
        tokens, pooled = conv.vit(x)
    assert max_diff(tokens, seq) < TOL and max_diff(pooled, ref_pooled) < TOL
    with pytest.raises(ValueError, match="pool_type='tok' but the checkpoint has no visual.class_embedding"):
        build_converted_vit(oc_config(), {k: v for k, v in no_cls.items()})


@pytest.mark.parametrize("key,value", [
    ("attentional_pool", True), ("ls_init_value", 1e-5), ("block_type", "custom"), ("qk_norm", True),
    ("scaled_cosine_attn", True), ("scale_heads", True), ("scale_attn_inner", True), ("scale_attn", True),
    ("scale_fc", True), ("timm_model_name", "vit_base_patch16_224"), ("layers", [3, 4, 6, 3]),
    ("pool_type", "max"), ("pos_embed_type", "rope"), ("norm_kwargs", {"eps": 1e-6, "elementwise_affine": False}),
    ("act_kwargs", {"negative_slope": 0.1}), ("bogus_option", 1),
])
def test_other_options_are_refused_by_name(key, value):
    _, sd = reference(oc_config())
    oc = oc_config(**{key: value})
    with pytest.raises(ValueError, match=key):
        build_converted_vit(oc, sd)


def test_config_and_tensors_must_agree():
    oc = oc_config(no_ln_pre=True)
    _, sd = reference(oc)
    with pytest.raises(KeyError, match=r"missing \['visual.ln_pre.bias', 'visual.ln_pre.weight'\]"):
        build_converted_vit(oc_config(), sd)  # config says ln_pre, checkpoint has none
    _, with_ln = reference(oc_config())
    with pytest.raises(KeyError, match=r"without a mapping \['visual.ln_pre.bias', 'visual.ln_pre.weight'\]"):
        build_converted_vit(oc, with_ln)
    for bad, match in ((dict(in_channels=4), "in_channels=4"), (dict(image_size=16), "positional_embedding"),
                       (dict(layers=3), "layers=3"), (dict(mlp_ratio=2.0), "mlp_ratio"),
                       (dict(width=32), "width 32")):
        with pytest.raises(ValueError, match=match):
            build_converted_vit(oc_config(no_ln_pre=True, **bad), sd)
    with pytest.raises(ValueError, match="quick_gelu"):
        build_converted_vit(oc_config(no_ln_pre=True, quick_gelu=True, act_kwargs={"approximate": "tanh"}), sd)


def test_export_folds_our_options_exactly():
    """Our switches open_clip lacks are rewritten exactly: patch bias → positions, sin-cos → table, no qkv bias →
    zeros, final LayerNorm without affine → ones/zeros."""
    torch.manual_seed(0)
    cfg = vit_config("tiny", class_token=True, pool="avg", proj_bias=False, qkv_bias=False, patch_bias=True,
                     final_norm_affine=False, norm_pre=True)
    vit = randomize(LatentViT(cfg), seed=2)
    model_cfg, sd, notes = open_clip_from_vit(vit, 8)
    ref = open_clip_visual(model_cfg)
    ref.load_state_dict({k.removeprefix("visual."): v for k, v in sd.items()})  # strict
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref_pooled, ref_tokens = ref.eval()(x)
        tokens, pooled = vit(x)
    assert max_diff(tokens, ref_tokens) < TOL and max_diff(pooled, ref_pooled) < TOL
    assert any("patch bias folded" in n for n in notes)


def test_export_refuses_what_open_clip_cannot_express():
    vit = LatentViT(vit_config("tiny"))  # our default design: no class token, mean-pool head, proj bias
    with pytest.raises(ValueError, match=r"class_token=False.*pool='mean'.*proj_bias=True"):
        open_clip_from_vit(vit, 8)
    learned = LatentViT(vit_config("tiny", class_token=True, pool="avg", proj_bias=False, pos_embed="learned",
                                   grid_size=4))
    with pytest.raises(ValueError, match="learned positions are for a 4x4 grid"):
        open_clip_from_vit(learned, 16)


def test_file_loading_and_from_open_clip_cli(tmp_path):
    oc = oc_config(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True, norm_kwargs={"eps": 1e-6})
    ref, sd = reference(oc)
    sd = {**sd, "logit_scale": torch.tensor(4.6), "text.token_embedding.weight": torch.zeros(10, 8)}
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "open_clip_config.json").write_text(json.dumps(oc))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ck / "open_clip_pytorch_model.bin")
    cfg, loaded = load_open_clip_checkpoint(ck)
    assert sorted(build_converted_vit(cfg, loaded).skipped) == ["logit_scale", "text.token_embedding.weight"]
    (ck / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        load_open_clip_checkpoint(ck)
    save_file(sd, str(ck / "open_clip_model.safetensors"))
    build_random_vae(tiny_vae_config()).save_pretrained(str(tmp_path / "vae"))
    main(["--from-open-clip", str(ck), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "exp")])
    enc = load_encoder(tmp_path / "exp")
    assert enc.image_size == 64 and enc.num_tokens == 16 and enc.vae.scaling_factor == 0.3611
    assert enc.decoder is None and enc.config["conversion_notes"]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tok, pooled = enc.encode(images)
    with torch.no_grad():
        ref_pooled, ref_tokens = ref(enc.encode_latents(images))
    assert max_diff(tok, ref_tokens) < TOL and max_diff(pooled, ref_pooled) < TOL
    with pytest.raises(RuntimeError, match="no ViT decoder"):
        enc.decode(tok)
    rgb = oc_config(in_channels=3)
    ck3 = tmp_path / "rgb"
    ck3.mkdir()
    (ck3 / "open_clip_config.json").write_text(json.dumps(rgb))
    save_file(reference(rgb)[1], str(ck3 / "open_clip_model.safetensors"))
    with pytest.raises(SystemExit, match="reads 3 channels, the VAE gives 16"):
        main(["--from-open-clip", str(ck3), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "exp3")])


def test_new_head_options_validate():
    with pytest.raises(ValueError, match="final_ln_after_pool needs pool"):
        LatentViT(vit_config("tiny", final_ln_after_pool=True))  # pool='mean' has its own LayerNorm
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        LatentViT(vit_config("tiny", pool="max"))
    vit = LatentViT(vit_config("tiny", pool="none", proj_bias=False)).eval()
    tokens, pooled = vit(torch.randn(2, 16, 8, 8))
    assert tokens.shape == (2, 16, 64) and pooled.shape == (2, 16, 64)  # no class token: every patch token


def test_every_clipa_config_open_clip_ships_is_accepted():
    """The lineage's configs as open_clip 3.3.0 ships them (CLIPA L/H/bigG, 224/336): tensor shapes from open_clip's
    own tower built on the meta device, the config read without a refusal."""

    import open_clip


    files = sorted((Path(open_clip.__file__).parent / "model_configs").glob("*CLIPA*.json"))
    assert len(files) >= 6
    for f in files:
        oc = json.loads(f.read_text())
        with torch.device("meta"):
            visual = open_clip_visual(oc)
        sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
        cfg, size, _ = vit_config_from_open_clip(oc, sd)
        vc = oc["vision_cfg"]
        assert not cfg.norm_pre and cfg.pool == "avg" and cfg.final_ln_after_pool, f.name
        assert size == vc["image_size"] and cfg.depth == vc["layers"] and cfg.in_channels == 3, f.name
