"""Frozen vision towers and their image preprocessing.

* ``OV3Tower``: an OpenVision 3 encoder export folder (``encoder.export.load_encoder``); features = hidden states
  after block ``select_layer`` (``-1`` = ``z_u``). ``select_feature``: ``patch`` (all tokens), ``mean`` (their mean
  as one token) or ``pooled`` (the encoder's pooled embedding as one token; ignores the layer).
* ``HFTower``: a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` folder (with its image processor), so
  baselines go through the same bridge; ``select_feature`` ``patch`` (CLIP drops its CLS token, as LLaVA),
  ``cls_patch`` (all) or ``pooled`` (``pooler_output``).

Preprocessing (``image_aspect_ratio``): ``pad`` (LLaVA-1.5) pads to a square centred on the image, then resizes;
OV3 pads with the image's mean colour (``ov3common.images.pad_to_square``), the HF towers with the processor's
mean colour (LLaVA's ``expand2square(image_mean * 255)``). ``crop`` resizes the short side and centre-crops.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

from encoder.export import load_encoder, read_export_config
from ov3common.images import center_crop_resize, pad_to_square, to_tensor_pm1

OV3_FEATURES = ("patch", "mean", "pooled")
HF_FEATURES = ("patch", "cls_patch", "pooled")
ASPECT_RATIOS = ("pad", "crop")
_HF_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def tower_kind(path: str | os.PathLike) -> str:
    """``"ov3"`` for an encoder export folder, ``"clip"`` / ``"siglip"`` for a transformers folder."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"vision tower: {cfg_path} does not exist (expected an OV3 encoder export or a "
                                "transformers CLIP/SigLIP vision model folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") == "openvision3-encoder":
        return "ov3"
    kind = _HF_TYPES.get(cfg.get("model_type", ""))
    if kind is None:
        raise ValueError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not a supported vision tower "
                         f"({sorted(_HF_TYPES)} or an OV3 encoder export)")
    return kind


# ---------------------------------------------------------------------------------------------- preprocessing
class OV3ImageProcessor:
    """PIL → ``[3, S, S]`` in [-1, 1] (picklable, for DataLoader workers)."""

    def __init__(self, size: int, aspect: str = "pad"):
        if aspect not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect!r}")
        self.size, self.aspect = int(size), aspect

    def __call__(self, img: Image.Image) -> Tensor:
        if self.aspect == "pad":
            img = pad_to_square(img).resize((self.size, self.size), Image.BICUBIC)
        else:
            img = center_crop_resize(img, self.size)
        return to_tensor_pm1(img)


class HFImageProcessor:
    """PIL → pixel_values ``[3, S, S]`` through the tower's own transformers image processor."""

    def __init__(self, path: str, aspect: str = "pad"):
        if aspect not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect!r}")
        self.path, self.aspect = str(path), aspect
        self._proc = None

    @property
    def proc(self):
        if self._proc is None:
            self._proc = AutoImageProcessor.from_pretrained(self.path)
        return self._proc

    def __getstate__(self) -> dict:
        return {"path": self.path, "aspect": self.aspect, "_proc": None}

    def __call__(self, img: Image.Image) -> Tensor:
        if self.aspect == "pad":
            fill = tuple(int(round(255 * m)) for m in self.proc.image_mean)
            img = pad_to_square(img, fill)
        return self.proc(images=img, return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------------------------------------- towers
class OV3Tower(nn.Module):
    """The frozen OV3 encoder as a LLaVA vision tower: ``images [B,3,S,S] in [-1,1] → [B, N, D]``."""

    def __init__(self, path: str | os.PathLike, select_layer: int = -2, select_feature: str = "patch",
                 aspect: str = "pad"):
        super().__init__()

        if select_feature not in OV3_FEATURES:
            raise ValueError(f"select_feature {select_feature!r} is not one of {OV3_FEATURES} for an OV3 tower")
        self.path, self.kind = str(Path(path).resolve()), "ov3"
        self.encoder = load_encoder(path)
        depth = len(self.encoder.vit.blocks)
        if not -depth <= select_layer < depth:
            raise ValueError(f"select_layer {select_layer} out of range for an encoder of depth {depth}")
        self.select_layer, self.select_feature = select_layer, select_feature
        self.image_size = self.encoder.image_size
        self.hidden_size = self.encoder.embed_dim if select_feature == "pooled" else self.encoder.width
        self.num_tokens = 1 if select_feature in ("mean", "pooled") else self.encoder.num_tokens
        self.processor = OV3ImageProcessor(self.image_size, aspect)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> OV3Tower:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.select_feature == "pooled":
            return self.encoder.encode(images)[1][:, None]
        feats = self.encoder.forward_features(images, self.select_layer)
        return feats.mean(1, keepdim=True) if self.select_feature == "mean" else feats


class HFTower(nn.Module):
    """A transformers CLIP / SigLIP vision model as a LLaVA vision tower."""

    def __init__(self, path: str | os.PathLike, select_layer: int = -2, select_feature: str = "patch",
                 aspect: str = "pad"):
        super().__init__()

        if select_feature not in HF_FEATURES:
            raise ValueError(f"select_feature {select_feature!r} is not one of {HF_FEATURES} for a {path} tower")
        self.path, self.kind = str(Path(path).resolve()), tower_kind(path)
        cls = CLIPVisionModel if self.kind == "clip" else SiglipVisionModel
        self.model = cls.from_pretrained(self.path)
        vcfg = self.model.config
        vcfg = getattr(vcfg, "vision_config", vcfg)
        n_layers = vcfg.num_hidden_layers
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(f"select_layer {select_layer} out of range for {n_layers} layers")
        self.select_layer, self.select_feature = select_layer, select_feature
        self.image_size = vcfg.image_size
        self.hidden_size = vcfg.hidden_size
        n_patch = (vcfg.image_size // vcfg.patch_size) ** 2
        has_cls = self.kind == "clip"
        self.num_tokens = {"patch": n_patch, "cls_patch": n_patch + has_cls, "pooled": 1}[select_feature]
        self.processor = HFImageProcessor(self.path, aspect)
        self.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> HFTower:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=images.to(dtype), output_hidden_states=self.select_feature != "pooled")
        if self.select_feature == "pooled":
            return out.pooler_output[:, None]
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch" and self.kind == "clip":
            feats = feats[:, 1:]
        return feats


def build_vision_tower(path: str | os.PathLike, select_layer: int = -2, select_feature: str = "patch",
                       aspect: str = "pad") -> OV3Tower | HFTower:
    """The frozen tower for ``path`` (OV3 export or transformers CLIP/SigLIP folder), on CPU in float32."""
    kind = tower_kind(path)
    cls = OV3Tower if kind == "ov3" else HFTower
    return cls(path, select_layer, select_feature, aspect)


def build_processor(path: str | os.PathLike, aspect: str = "pad"):
    """Only the image preprocessing of a tower (cheap; no weights loaded for HF towers)."""
    if tower_kind(path) == "ov3":
        return OV3ImageProcessor(int(read_export_config(path)["image_size"]), aspect)
    return HFImageProcessor(str(Path(path).resolve()), aspect)
