"""Official OpenVision-family checkpoints (open_clip layout) ⇄ our ``LatentViT``, both ways.

Input: a folder with ``open_clip_config.json`` + ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``),
as the UCSC-VLAA releases ship them (e.g. HF ``UCSC-VLAA/openvision3-vit-base-patch2-32``; download it yourself,
nothing is fetched here). ``model_cfg.vision_cfg`` is read with open_clip 3.3.0's semantics (``CLIPVisionCfg`` →
``VisionTransformer``), plus ``in_channels`` (the key OpenVision's open_clip fork adds for 16-channel VAE latents).
``vision_cfg.image_size`` is the tower's input side, i.e. the *latent* side for OV3 (32 = 256 px / 8).

Every option is either mapped, or accepted as inert at inference and reported in the notes (``patch_dropout``,
``output_tokens``, options of a disabled attentional pooler / timm trunk), or refused by name. Mapped: ``ln_pre``
present or ``no_ln_pre``; ``pool_type`` tok / avg / none; ``final_ln_after_pool``; ``norm_kwargs.eps``;
``act_kwargs`` / ``quick_gelu``; a class token or none (a state dict without ``visual.class_embedding``); learned
or ``sin_cos_2d`` positions (both are the ``visual.positional_embedding`` table: loaded as is); ``in_channels``;
``image_size`` / grid; the extra ``visual.conv1.bias`` / ``visual.proj_bias`` of OpenVision's JAX export.
Only ``visual.*`` tensors are converted (the rest is listed as skipped). The release ships no ViT decoder, so the
export has ``decoder: null`` (``make rae-decoder`` trains one).

    python -m encoder.export --from-open-clip DIR --vae /path/to/FLUX.1-dev/vae --out runs/ov3-b2/export

(:func:`encoder.export.import_open_clip`: this module maps layouts, ``encoder.export`` writes the folders.)
The other way, :func:`open_clip_from_vit` writes our ViT in that layout (``python -m encoder.export --open-clip``);
:func:`open_clip_visual` builds open_clip's own ``VisionTransformer`` for such a config (the reference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from encoder.models import LatentViT, ViTConfig, sincos_2d

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONFIG_FILE = "open_clip_config.json"

# vision_cfg keys (open_clip 3.3.0 CLIPVisionCfg + OpenVision's in_channels), by what the converter does with them
MAPPED = ("layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "in_channels", "no_ln_pre",
          "pos_embed_type", "final_ln_after_pool", "pool_type", "act_kwargs", "norm_kwargs")
INERT = {  # key: (open_clip default, why it does not change the converted tower)
    "patch_dropout": (0.0, "training-time token dropout (identity at inference)"),
    "output_tokens": (False, "only what open_clip's forward returns (ours returns tokens and pooled)"),
    "attn_pooler_queries": (256, "used only with attentional_pool"),
    "attn_pooler_heads": (8, "used only with attentional_pool"),
    "timm_model_pretrained": (False, "used only with timm_model_name"),
    "timm_pool": ("avg", "used only with timm_model_name"),
    "timm_proj": ("linear", "used only with timm_model_name"),
    "timm_proj_bias": (False, "used only with timm_model_name"),
    "timm_drop": (0.0, "used only with timm_model_name"),
    "timm_drop_path": (None, "used only with timm_model_name"),
}
REFUSED = {  # key: (accepted values, what a different value builds)
    "timm_model_name": ((None, ""), "a timm trunk instead of open_clip's VisionTransformer"),
    "attentional_pool": ((False,), "an attentional pooler (CoCa)"),
    "ls_init_value": ((None,), "LayerScale in every block"),
    "block_type": ((None, "default"), "open_clip's custom attention block"),
    "qk_norm": ((False,), "LayerNorm on q and k"),
    "scaled_cosine_attn": ((False,), "scaled cosine attention"),
    "scale_heads": ((False,), "per-head attention scales"),
    "scale_attn_inner": ((False,), "a LayerNorm inside attention"),
    "scale_attn": ((False,), "a LayerNorm after attention"),
    "scale_fc": ((False,), "a LayerNorm inside the MLP"),
}
POOLS = {"tok": "cls", "avg": "avg", "none": "none"}  # open_clip pool_type → ViTConfig.pool
BLOCK_KEYS = {  # open_clip ResidualAttentionBlock → our Block
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}


class Converted(NamedTuple):
    vit: LatentViT  # eval mode, official weights loaded strictly
    input_size: int  # the tower's input side (latent pixels for OV3; image pixels for an RGB tower)
    skipped: list[str]  # non-visual tensors (text tower, logit scale, ...)
    notes: list[str]  # what was accepted without changing the tower, or read from the tensors


def _err(msg: str) -> ValueError:
    return ValueError(f"{CONFIG_FILE}: {msg}")


def _key_map(cfg: ViTConfig) -> dict[str, str]:
    """Official ``visual.*`` key → our key, for exactly the tensors this layout has."""
    m = {"visual.conv1.weight": "patch_embed.weight", "visual.positional_embedding": "pos_embed",
         "visual.ln_post.weight": "final_norm.weight", "visual.ln_post.bias": "final_norm.bias",
         "visual.proj": "proj.weight"}
    if cfg.class_token:
        m["visual.class_embedding"] = "cls_token"
    if cfg.norm_pre:
        m.update({"visual.ln_pre.weight": "norm_pre.weight", "visual.ln_pre.bias": "norm_pre.bias"})
    if cfg.patch_bias:
        m["visual.conv1.bias"] = "patch_embed.bias"  # OpenVision's JAX export; not stock open_clip
    if cfg.proj_bias:
        m["visual.proj_bias"] = "proj.bias"  # idem
    for i in range(cfg.depth):
        m.update({f"visual.transformer.resblocks.{i}.{k}": f"blocks.{i}.{v}" for k, v in BLOCK_KEYS.items()})
    return m


def _activation(model_cfg: dict, vc: dict) -> str:
    act_kwargs = vc.get("act_kwargs") or {}
    if model_cfg.get("quick_gelu", False):
        if act_kwargs:
            raise _err(f"vision_cfg.act_kwargs={act_kwargs!r} with quick_gelu: QuickGELU takes no arguments")
        return "quick_gelu"
    bad = sorted(set(act_kwargs) - {"approximate"})
    if bad:
        raise _err(f"vision_cfg.act_kwargs keys {bad} are not supported (only GELU's 'approximate')")
    approx = act_kwargs.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise _err(f"vision_cfg.act_kwargs.approximate={approx!r} (none | tanh)")
    return "gelu_tanh" if approx == "tanh" else "gelu"


def vit_config_from_open_clip(oc_cfg: dict, sd: dict[str, Tensor]) -> tuple[ViTConfig, int, list[str]]:
    """``(ViTConfig, input_size, notes)`` from ``open_clip_config.json`` with open_clip's semantics, checked
    against the tensors. Raises ``ValueError`` naming any option it cannot reproduce."""
    model_cfg = oc_cfg.get("model_cfg", oc_cfg)
    if not isinstance(model_cfg.get("vision_cfg"), dict):
        raise KeyError(f"{CONFIG_FILE}: missing key 'model_cfg.vision_cfg'")
    vc = model_cfg["vision_cfg"]
    notes = [f"model_cfg.{k}: not part of the vision tower (not converted)"
             for k in sorted(model_cfg) if k not in ("vision_cfg", "embed_dim", "quick_gelu")]
    unknown = sorted(set(vc) - set(MAPPED) - set(INERT) - set(REFUSED))
    if unknown:
        raise _err(f"vision_cfg keys {unknown} are not open_clip VisionTransformer options this converter knows")
    for key, (ok, what) in REFUSED.items():
        if vc.get(key, ok[0]) not in ok:
            raise _err(f"vision_cfg.{key}={vc[key]!r} is not supported: it builds {what}, which LatentViT lacks")
    if isinstance(vc.get("layers", 12), list | tuple):
        raise _err(f"vision_cfg.layers={vc['layers']!r} builds a ModifiedResNet, not a VisionTransformer")
    for key, (default, why) in INERT.items():
        if key in vc and vc[key] != default:
            notes.append(f"vision_cfg.{key}={vc[key]!r}: {why}; no effect on the converted tower")
    bad = sorted(set(vc.get("norm_kwargs") or {}) - {"eps"})
    if bad:
        raise _err(f"vision_cfg.norm_kwargs keys {bad} are not supported (only 'eps')")
    eps = float((vc.get("norm_kwargs") or {}).get("eps", 1e-5))  # torch LayerNorm's default, as open_clip
    act = _activation(model_cfg, vc)
    pool_type = vc.get("pool_type", "tok")
    if pool_type not in POOLS:
        raise _err(f"vision_cfg.pool_type={pool_type!r} (tok | avg | none)")
    pos_type = vc.get("pos_embed_type", "learnable")
    if pos_type not in ("learnable", "sin_cos_2d"):
        raise _err(f"vision_cfg.pos_embed_type={pos_type!r} (learnable | sin_cos_2d)")

    for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj"):
        if k not in sd:
            raise KeyError(f"open_clip checkpoint: missing tensor {k!r}")
    conv = sd["visual.conv1.weight"]
    width, in_ch, p, p2 = conv.shape
    if vc.get("width", 768) != width or vc.get("patch_size", 16) != p or p != p2:
        raise _err(f"vision_cfg width {vc.get('width', 768)} / patch_size {vc.get('patch_size', 16)} disagree "
                   f"with visual.conv1.weight {tuple(conv.shape)}")
    if "in_channels" not in vc:
        notes.append(f"vision_cfg.in_channels absent: {in_ch}, from visual.conv1.weight")
    elif vc["in_channels"] != in_ch:
        raise _err(f"vision_cfg.in_channels={vc['in_channels']} but visual.conv1.weight has {in_ch}")
    size = vc.get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise _err(f"vision_cfg.image_size={size!r}: only square inputs are supported")
        size = size[0]
    grid = int(size) // p
    has_cls = "visual.class_embedding" in sd
    if not has_cls:
        notes.append("no visual.class_embedding: a ViT without class token (open_clip itself always has one)")
        if pool_type == "tok":
            raise _err("vision_cfg.pool_type='tok' but the checkpoint has no visual.class_embedding")
    pos = sd["visual.positional_embedding"]
    if tuple(pos.shape) != (grid * grid + has_cls, width):
        raise _err(f"vision_cfg.image_size {size} / patch {p} gives a {grid}x{grid} grid"
                   f"{' + class token' if has_cls else ''}, but visual.positional_embedding is {tuple(pos.shape)}")
    if pos_type == "sin_cos_2d":
        notes.append("pos_embed_type='sin_cos_2d': its fixed table (visual.positional_embedding) is used as is")
    head_width = vc.get("head_width", 64)
    if width % head_width:
        raise _err(f"vision_cfg.width {width} is not a multiple of head_width {head_width}")
    depth = vc.get("layers", 12)
    found = {int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks.")}
    if found != set(range(depth)):
        raise _err(f"vision_cfg.layers={depth} but the checkpoint has resblocks {sorted(found)}")
    mlp_ratio = float(vc.get("mlp_ratio", 4.0))
    hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if int(width * mlp_ratio) != hidden:
        raise _err(f"vision_cfg.mlp_ratio={mlp_ratio} gives {int(width * mlp_ratio)} MLP units, "
                   f"visual.transformer.resblocks.0.mlp.c_fc.weight has {hidden}")
    embed_dim = sd["visual.proj"].shape[1]
    if model_cfg.get("embed_dim", embed_dim) != embed_dim:
        raise _err(f"model_cfg.embed_dim={model_cfg['embed_dim']} but visual.proj is {tuple(sd['visual.proj'].shape)}")
    for extra, what in (("visual.conv1.bias", "patch bias"), ("visual.proj_bias", "projection bias")):
        if extra in sd:
            notes.append(f"{extra}: a {what} (OpenVision's JAX export; stock open_clip has none) is converted")
    cfg = ViTConfig(
        width=width, depth=depth, heads=width // head_width, embed_dim=embed_dim, mlp_ratio=mlp_ratio,
        patch_size=p, in_channels=in_ch, act=act, norm_eps=eps, qkv_bias=True,
        patch_bias="visual.conv1.bias" in sd, pos_embed="learned", grid_size=grid, class_token=has_cls,
        norm_pre=not vc.get("no_ln_pre", False), pool=POOLS[pool_type], final_norm_affine=True,
        proj_bias="visual.proj_bias" in sd, final_ln_after_pool=bool(vc.get("final_ln_after_pool", False)))
    return cfg, int(size), notes


def convert_open_clip_visual(sd: dict[str, Tensor], cfg: ViTConfig) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip ``visual.*`` → ``LatentViT`` keys. Returns (our state dict, skipped non-visual keys). Raises
    ``KeyError`` naming the official keys the layout of ``cfg`` expects and misses, or has no place for."""
    kmap = _key_map(cfg)
    visual = {k for k in sd if k.startswith("visual.")}
    missing, unexpected = sorted(set(kmap) - visual), sorted(visual - set(kmap))
    if missing or unexpected:
        raise KeyError(f"open_clip checkpoint vs its config: missing {missing}, without a mapping {unexpected}")
    out = {}
    for k, ours in kmap.items():
        v = sd[k]
        if k == "visual.class_embedding":
            v = v.reshape(1, 1, -1)
        elif k == "visual.positional_embedding":
            v = v.unsqueeze(0)
        elif k == "visual.proj":
            v = v.t()
        out[ours] = v.contiguous()
    return out, sorted(k for k in sd if not k.startswith("visual."))


def build_converted_vit(oc_cfg: dict, sd: dict[str, Tensor]) -> Converted:
    """Our ``LatentViT`` with the official weights loaded strictly (every key maps, nothing left over)."""
    cfg, size, notes = vit_config_from_open_clip(oc_cfg, sd)
    ours, skipped = convert_open_clip_visual(sd, cfg)
    vit = LatentViT(cfg)
    missing, unexpected = vit.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise KeyError(f"converted checkpoint: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return Converted(vit.eval(), size, skipped, notes)


def load_open_clip_checkpoint(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """Read ``open_clip_config.json`` and the weights (safetensors preferred; ``.bin`` via weights_only)."""
    root = Path(folder)
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"official checkpoint: missing {cfg_path}")
    for name in OPEN_CLIP_WEIGHT_FILES:
        w = root / name
        if w.is_file():
            if w.suffix == ".safetensors":
                sd = load_file(str(w))
            else:  # the official format is a pickled state dict: tensors only
                sd = torch.load(str(w), map_location="cpu", weights_only=True)
            break
    else:
        raise FileNotFoundError(f"official checkpoint: none of {OPEN_CLIP_WEIGHT_FILES} in {root}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        return json.loads(cfg_path.read_text()), sd
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------- ours → open_clip layout
def open_clip_from_vit(vit: LatentViT, input_size: int) -> tuple[dict, dict[str, Tensor], list[str]]:
    """Our ViT → (``model_cfg`` dict, ``visual.*`` tensors, notes) that open_clip's ``VisionTransformer`` (with
    OpenVision's ``in_channels``) loads strictly and that give the same tokens and pooled output.

    Exact rewrites: a patch bias is folded into the position table, sin-cos positions become that table (at
    ``input_size``), a missing qkv bias becomes zeros, a final LayerNorm without affine becomes ones / zeros.
    Raises ``ValueError`` listing what open_clip's layout cannot express (no class token, our mean-pool head,
    a projection bias): exporting those would change the outputs."""
    c = vit.cfg
    problems = []
    if not c.class_token:
        problems.append("class_token=False (open_clip's VisionTransformer always prepends a class token, and every "
                        "patch token attends to it)")
    if c.pool == "mean":
        problems.append("pool='mean' (mean → its own LayerNorm → Linear, z_u through a separate LayerNorm; "
                        "open_clip's head has one LayerNorm, before or after pooling)")
    if c.proj_bias:
        problems.append("proj_bias=True (open_clip's visual.proj has no bias)")
    grid = input_size // c.patch_size
    if input_size % c.patch_size or (c.pos_embed == "learned" and grid != c.grid_size):
        problems.append(f"input size {input_size} (learned positions are for a {c.grid_size}x{c.grid_size} grid "
                        f"of patch {c.patch_size})")
    if problems:
        raise ValueError("the open_clip layout cannot reproduce this encoder: " + "; ".join(problems))
    notes = ["positions written as a fixed table (pos_embed_type 'learnable') for a "
             f"{grid}x{grid} grid: input side {input_size}"]
    ours = {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    d = c.width
    if c.pos_embed == "learned":
        pos = ours.pop("pos_embed")[0].clone()
    else:
        pos = torch.cat([torch.zeros(1, d), sincos_2d(d, grid, grid)])
    if c.patch_bias:
        pos[1:] += ours.pop("patch_embed.bias")
        notes.append("patch bias folded into the position table (open_clip's conv1 has no bias)")
    ours["pos_embed"] = pos.unsqueeze(0)
    for i in range(c.depth):
        if not c.qkv_bias:
            ours[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
    if not c.final_norm_affine:
        ours.update({"final_norm.weight": torch.ones(d), "final_norm.bias": torch.zeros(d)})
    exp = ViTConfig(**{**c.to_dict(), "patch_bias": False, "qkv_bias": True, "final_norm_affine": True,
                       "pos_embed": "learned", "grid_size": grid})
    sd = {}
    for k, src in _key_map(exp).items():
        v = ours.pop(src)
        if k == "visual.class_embedding":
            v = v.reshape(-1)
        elif k == "visual.positional_embedding":
            v = v[0]
        elif k == "visual.proj":
            v = v.t()
        sd[k] = v.contiguous()
    if ours:
        raise KeyError(f"open_clip export: tensors without an open_clip key: {sorted(ours)}")
    vision_cfg = {
        "image_size": input_size, "layers": c.depth, "width": d, "head_width": d // c.heads,
        "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size, "in_channels": c.in_channels,
        "no_ln_pre": not c.norm_pre, "pool_type": {v: k for k, v in POOLS.items()}[c.pool],
        "final_ln_after_pool": c.final_ln_after_pool, "pos_embed_type": "learnable",
        "norm_kwargs": {"eps": c.norm_eps}, "output_tokens": True}
    if c.act == "gelu_tanh":
        vision_cfg["act_kwargs"] = {"approximate": "tanh"}
    model_cfg = {"embed_dim": c.embed_dim, "quick_gelu": c.act == "quick_gelu", "vision_cfg": vision_cfg}
    return model_cfg, sd, notes


def open_clip_visual(oc_cfg: dict) -> nn.Module:
    """open_clip's own ``VisionTransformer`` for a config (random weights), built by open_clip's
    ``_build_vision_tower``. open_clip 3.3.0 always builds a 3-channel ``conv1``; for ``in_channels`` (the key of
    OpenVision's fork) that conv is replaced by one with that many input channels — the only change."""
    from open_clip.model import _build_vision_tower

    model_cfg = oc_cfg.get("model_cfg", oc_cfg)
    vc = dict(model_cfg["vision_cfg"])
    in_ch = vc.pop("in_channels", 3)
    visual = _build_vision_tower(model_cfg["embed_dim"], vc, quick_gelu=model_cfg.get("quick_gelu", False))
    if in_ch != 3:
        c = visual.conv1
        visual.conv1 = nn.Conv2d(in_ch, c.out_channels, c.kernel_size, c.stride, bias=False)
    return visual


def load_open_clip_visual(folder: str | Path) -> nn.Module:
    """A checkpoint folder (official, or ours from ``encoder.export --open-clip``) as open_clip's
    ``VisionTransformer``, its ``visual.*`` weights loaded strictly; eval mode."""
    oc_cfg, sd = load_open_clip_checkpoint(folder)
    visual = open_clip_visual(oc_cfg)
    visual.load_state_dict({k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")})
    return visual.eval()
