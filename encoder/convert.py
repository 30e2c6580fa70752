"""Convert an official OpenVision 3 checkpoint (open_clip layout) into our export folder.

Input: a folder with ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (or ``.safetensors``), as on
HF ``UCSC-VLAA/openvision3-vit-{base,large}-patch2-{32,28}`` (download it yourself; nothing is fetched here).
Only ``visual.*`` keys are converted (text-tower keys are reported as skipped). The official release ships no
ViT decoder, so the export has ``decoder: null`` and ``decode()`` raises.

    python -m encoder.convert --checkpoint DIR --vae /path/to/FLUX.1-dev/vae --out runs/ov3-b2/export
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from encoder.models import LatentViT, ViTConfig

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def vit_config_from_open_clip(oc_cfg: dict, sd: dict[str, Tensor]) -> tuple[ViTConfig, int]:
    """``(ViTConfig, image_size)`` from ``open_clip_config.json`` (``model_cfg.vision_cfg``), checked against
    the tensor shapes."""
    model_cfg = oc_cfg.get("model_cfg", oc_cfg)
    vc = model_cfg.get("vision_cfg")
    if vc is None:
        raise KeyError("open_clip_config.json: missing key 'model_cfg.vision_cfg'")
    for key, ok in (("attentional_pool", False), ("no_ln_pre", False), ("final_ln_after_pool", False)):
        if bool(vc.get(key, False)) != ok:
            raise ValueError(f"open_clip_config.json: vision_cfg.{key}={vc[key]!r} is not supported")
    if vc.get("pool_type", "tok") != "tok":
        raise ValueError(f"open_clip_config.json: vision_cfg.pool_type={vc['pool_type']!r} (only 'tok')")
    conv = sd["visual.conv1.weight"]
    width, in_ch, p, _ = conv.shape
    layers = vc.get("layers", 12)
    if width != vc.get("width", width) or p != vc.get("patch_size", p):
        raise ValueError(f"open_clip_config.json vision_cfg (width {vc.get('width')}, patch {vc.get('patch_size')}) "
                         f"disagrees with visual.conv1.weight {tuple(conv.shape)}")
    heads = vc.get("heads") or width // vc.get("head_width", 64)
    pos = sd["visual.positional_embedding"]
    grid = round((pos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != pos.shape[0]:
        raise ValueError(f"visual.positional_embedding {tuple(pos.shape)} is not 1 + a square grid")
    image_size = vc.get("image_size", grid * p * 8)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    mlp_hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg = ViTConfig(
        width=width, depth=layers, heads=heads, embed_dim=sd["visual.proj"].shape[1], mlp_ratio=mlp_hidden / width,
        patch_size=p, in_channels=in_ch, act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        norm_eps=1e-5, qkv_bias=True, patch_bias=False, pos_embed="learned", grid_size=grid, class_token=True,
        norm_pre=True, pool="cls", final_norm_affine=True, proj_bias=False)
    return cfg, int(image_size)


def convert_open_clip_visual(sd: dict[str, Tensor], depth: int) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip ``visual.*`` → ``LatentViT`` keys. Returns (our state dict, skipped non-visual keys).
    Raises ``KeyError`` naming any ``visual.*`` key that has no mapping."""
    out: dict[str, Tensor] = {}
    direct = {
        "visual.conv1.weight": "patch_embed.weight",
        "visual.ln_pre.weight": "norm_pre.weight", "visual.ln_pre.bias": "norm_pre.bias",
        "visual.ln_post.weight": "final_norm.weight", "visual.ln_post.bias": "final_norm.bias",
    }
    block = {
        "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
        "ln_2.bias": "norm2.bias", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
        "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
        "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
        "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    }
    skipped, unmapped = [], []
    prefix = "visual.transformer.resblocks."
    for k, v in sd.items():
        if not k.startswith("visual."):
            skipped.append(k)
        elif k in direct:
            out[direct[k]] = v
        elif k == "visual.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "visual.positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "visual.proj":
            out["proj.weight"] = v.t().contiguous()
        elif k.startswith(prefix):
            idx, rest = k[len(prefix):].split(".", 1)
            if rest not in block or not 0 <= int(idx) < depth:
                unmapped.append(k)
            else:
                out[f"blocks.{idx}.{block[rest]}"] = v
        else:
            unmapped.append(k)
    if unmapped:
        raise KeyError(f"open_clip checkpoint: visual keys without a mapping: {unmapped}")
    return out, skipped


def load_open_clip_checkpoint(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """Read ``open_clip_config.json`` and the weights (safetensors preferred; ``.bin`` via weights_only)."""
    root = Path(folder)
    cfg_path = root / "open_clip_config.json"
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
    return json.loads(cfg_path.read_text()), sd


def build_converted_vit(oc_cfg: dict, sd: dict[str, Tensor]) -> tuple[LatentViT, int, list[str]]:
    """Our ``LatentViT`` with the official weights loaded strictly (every key maps, nothing left over)."""
    cfg, image_size = vit_config_from_open_clip(oc_cfg, sd)
    ours, skipped = convert_open_clip_visual(sd, cfg.depth)
    vit = LatentViT(cfg)
    missing, unexpected = vit.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise KeyError(f"converted checkpoint: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return vit.eval(), image_size, skipped


def main(argv: list[str] | None = None) -> None:
    from encoder.export import export_encoder
    from encoder.vae import load_frozen_vae

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="folder with open_clip_config.json + weights")
    ap.add_argument("--vae", required=True, help="local FLUX.1 VAE: diffusers folder or ae.safetensors")
    ap.add_argument("--vae-config", default=None, help="diffusers VAE config.json for a single file (default FLUX.1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--copy-vae", action="store_true", help="copy the VAE into OUT/vae instead of referencing it")
    a = ap.parse_args(argv)
    for flag, p in (("--checkpoint", a.checkpoint), ("--vae", a.vae)):
        if not Path(p).exists():
            raise SystemExit(f"{flag}: path does not exist: {p}")
    oc_cfg, sd = load_open_clip_checkpoint(a.checkpoint)
    vit, image_size, skipped = build_converted_vit(oc_cfg, sd)
    vae = load_frozen_vae(a.vae, a.vae_config, scaling_factor=0.3611, shift_factor=0.0)
    out = export_encoder(a.out, vit, None, vae, image_size, tau=0.0, copy_vae=a.copy_vae, vae_source=a.vae,
                         vae_config=a.vae_config, extra={"source": str(Path(a.checkpoint).resolve())})
    print(f"converted {len(sd) - len(skipped)} visual tensors ({len(skipped)} non-visual skipped) → {out}")


if __name__ == "__main__":
    main()
