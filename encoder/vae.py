"""The frozen VAE: diffusers ``AutoencoderKL`` loaded from local files only.

Sources: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline folder
with a ``vae/`` subfolder) or one ``.safetensors`` file in the original FLUX ``ae.safetensors`` / LDM key layout
(converted with diffusers' own single-file helper, config from a local JSON or the built-in FLUX.1 config).
Latents follow the official OpenVision 3 script: ``posterior.mean * scaling_factor`` (0.3611 for FLUX.1) and
**no shift** (FLUX's own config has ``shift_factor=0.1159``; OV3 does not apply it, so ours defaults to 0).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file
from torch import Tensor, nn

from ov3common.config import path_field

# FLUX.1-dev / schnell VAE (diffusers layout of black-forest-labs/FLUX.1-dev/vae/config.json).
FLUX_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

OV3_SCALING_FACTOR = 0.3611
OV3_SHIFT_FACTOR = 0.0


def tiny_vae_config(latent_channels: int = 16, channels: tuple[int, ...] = (8, 16, 16, 16),
                    layers_per_block: int = 1, norm_num_groups: int = 4) -> dict:
    """A small AutoencoderKL of the FLUX family (8× down-sampling with 4 blocks, no quant convs)."""
    n = len(channels)
    return {**FLUX_VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(channels),
            "layers_per_block": layers_per_block, "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups, "sample_size": 64, "scaling_factor": 1.0, "shift_factor": 0.0}


def build_random_vae(config: dict | None = None, seed: int = 0) -> AutoencoderKL:
    """Randomly initialised AutoencoderKL (tests; ``config`` default = ``tiny_vae_config()``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(config or tiny_vae_config())


def _read_config(config: dict | str | os.PathLike | None) -> dict:
    if config is None:
        return dict(FLUX_VAE_CONFIG)
    if isinstance(config, dict):
        return dict(config)
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"VAE config not found: {p}")
    return json.loads(p.read_text())


def _is_diffusers_layout(sd: dict) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in sd)


def convert_flux_vae_state_dict(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """FLUX ``ae.safetensors`` / LDM VAE keys → diffusers keys (diffusers' own single-file helper)."""

    return convert_ldm_vae_checkpoint(sd, config)


def load_autoencoder(source: str | os.PathLike, config: dict | str | None = None) -> AutoencoderKL:
    """Load an AutoencoderKL from a local diffusers folder or a single safetensors file; never downloads."""
    src = Path(source)
    if src.is_dir():
        sub = src / "vae"
        root = sub if (sub / "config.json").is_file() else src
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {src} has no config.json (diffusers layout expected)")
        return AutoencoderKL.from_pretrained(str(root), local_files_only=True)
    if not src.is_file():
        raise FileNotFoundError(f"VAE path does not exist: {src}")
    if src.suffix != ".safetensors":
        raise ValueError(f"VAE file {src}: only .safetensors is loaded (no pickle formats)")
    cfg = _read_config(config)
    sd = load_file(str(src))
    if not _is_diffusers_layout(sd):
        sd = convert_flux_vae_state_dict(sd, cfg)
    vae = AutoencoderKL.from_config(cfg)
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"VAE file {src} does not match its config: missing {sorted(missing)[:8]} "
                       f"({len(missing)}), unexpected {sorted(unexpected)[:8]} ({len(unexpected)})")
    return vae


class FrozenVAE(nn.Module):
    """Frozen AutoencoderKL with the OV3 latent convention. ``decode`` keeps the graph (the reconstruction
    losses back-propagate through it into the ViT decoder); its parameters never get gradients.

    ``precision="bf16"`` runs encode/decode under bf16 autocast (convolutions and attention in bf16, the
    autocast fp32 ops in fp32, weights stay fp32); ``channels_last=True`` stores the weights and feeds the inputs
    in NHWC. Outputs are returned in the weights' dtype either way. ``python -m encoder.bench`` measures the time
    and the effect on latents and decoded images against fp32; both are options (default fp32, NCHW), and at real
    scale cached latents (``encoder.cache_latents``) remain the default, which takes the encoder out of the step.
    """

    PRECISIONS = ("fp32", "bf16")

    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None,
                 shift_factor: float = OV3_SHIFT_FACTOR, precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        if precision not in self.PRECISIONS:
            raise ValueError(f"FrozenVAE precision {precision!r}: expected one of {self.PRECISIONS}")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.shift_factor = float(shift_factor)
        self.precision = precision
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.train(False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> FrozenVAE:  # always eval
        return super().train(False)

    def _input(self, x: Tensor) -> tuple[Tensor, contextlib.AbstractContextManager]:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
               else contextlib.nullcontext())  # fp32: an outer autocast (train.precision=bf16) still applies
        return x, ctx

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B,3,H,W]`` in [-1, 1] → ``(posterior.mean - shift) * scale`` ``[B,C,H/8,W/8]``."""
        x, ctx = self._input(images)
        with ctx:
            mean = self.vae.encode(x).latent_dist.mean
        return ((mean.to(self.dtype) - self.shift_factor) * self.scaling_factor).contiguous()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents → images in (about) [-1, 1]; differentiable w.r.t. ``latents``."""
        z, ctx = self._input(latents / self.scaling_factor + self.shift_factor)
        with ctx:
            out = self.vae.decode(z).sample
        return out.to(self.dtype).contiguous()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def reference(self) -> dict:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_channels": self.latent_channels, "downsample": self.downsample}


def load_frozen_vae(source: str | os.PathLike, config: dict | str | None = None,
                    scaling_factor: float | None = None, shift_factor: float = OV3_SHIFT_FACTOR,
                    precision: str = "fp32", channels_last: bool = False) -> FrozenVAE:
    """``load_autoencoder`` + the OV3 latent convention (scale from the VAE config unless given, shift 0)."""
    return FrozenVAE(load_autoencoder(source, config), scaling_factor, shift_factor, precision, channels_last)


@dataclass
class VAEConfig:
    path: str = path_field("runs/toy/vae", "exists")  # diffusers folder or FLUX ae.safetensors
    config: str = path_field("", "file")  # diffusers config.json for a single file (default: FLUX.1)
    scaling_factor: float = 0.0  # 0: the VAE config's value (FLUX.1: 0.3611)
    shift_factor: float = 0.0  # OV3 applies no shift
    random_tiny: bool = False  # tests only: a random tiny VAE, `path` ignored
    precision: str = "fp32"  # fp32 | bf16: encode/decode under bf16 autocast (effect measured by encoder.bench)
    channels_last: bool = False  # NHWC weights/inputs for the VAE convolutions


def build_vae(vc: VAEConfig, device) -> FrozenVAE:
    if vc.random_tiny:
        return FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=vc.scaling_factor or 1.0,
                         precision=vc.precision, channels_last=vc.channels_last).to(device)
    if not vc.path:
        raise FileNotFoundError("vae.path: empty (set a local VAE folder/file, or `make toy-vae`)")
    return load_frozen_vae(vc.path, vc.config or None, vc.scaling_factor or None, vc.shift_factor, vc.precision,
                           vc.channels_last).to(device)
