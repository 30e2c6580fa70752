"""The frozen-encoder folder (docs/design.md §5) and its ONE loader.

Folder layout::

    export/
      config.json          # format, encoder/decoder configs, patch, grid, image size, VAE reference, τ
      model.safetensors    # encoder.* (LatentViT) + decoder.* (ViTDecoder); the VAE is not in here
      vae/                 # the frozen VAE in diffusers layout (config.json + diffusion_pytorch_model.safetensors)

``config["vae"]["path"]`` is ``"vae"`` (relative: the copy inside the folder, the default) or an absolute local
path to a diffusers folder / FLUX ``ae.safetensors`` (``copy_vae=False``; then ``vae.config`` may name a config).
Siblings only ever call :func:`load_encoder`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from encoder.convert import (
    CONFIG_FILE,
    OPEN_CLIP_WEIGHT_FILES,
    build_converted_vit,
    load_open_clip_checkpoint,
    open_clip_from_vit,
)
from encoder.models import DecoderConfig, LatentViT, ViTConfig, ViTDecoder, decoder_config_for, vit_config
from encoder.ov3 import LossConfig, ModelConfig, build_vit
from encoder.vae import FrozenVAE, VAEConfig, build_random_vae, build_vae, load_frozen_vae, tiny_vae_config
from ov3common.checkpoint import CheckpointManager, read_format_json
from ov3common.config import ConfigError, to_dict

FORMAT = "openvision3-encoder"
VERSION = 1


class FrozenEncoder(nn.Module):
    """Frozen OV3 encoder: images in [-1, 1] → VAE latents → ViT tokens; tokens → ViT decoder → VAE decoder.

    Attributes: ``width`` (token dim D), ``embed_dim`` (pooled E), ``grid_size`` (token grid side at
    ``image_size``), ``num_tokens``, ``image_size``, ``patch_size``, ``tau``, ``config`` (the config.json dict).
    All methods run without grad; the module is always in eval mode.
    """

    def __init__(self, vit: LatentViT, decoder: ViTDecoder | None, vae: FrozenVAE, config: dict):
        super().__init__()
        self.vit, self.decoder, self.vae = vit, decoder, vae
        self.config = config
        self.width = vit.cfg.width
        self.embed_dim = vit.cfg.embed_dim
        self.patch_size = vit.cfg.patch_size
        self.image_size = int(config["image_size"])
        self.downsample = vae.downsample
        self.grid_size = self.image_size // (self.downsample * self.patch_size)
        self.num_tokens = self.grid_size**2
        self.tau = float(config.get("tau", 0.0))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:  # frozen: always eval
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vit.patch_embed.weight.device

    def _check(self, images: Tensor) -> None:
        f = self.downsample * self.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"images must be [B,3,H,W] with H, W multiples of {f}; got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        """Images → scaled VAE latents ``[B, C, H/8, W/8]``."""
        self._check(images)
        return self.vae.encode(images.to(self.device))

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[B,3,H,W]`` in [-1, 1] → (tokens ``z_u`` ``[B,N,D]``, pooled ``[B,E]``)."""
        return self.vit(self.encode_latents(images).to(self.dtype))

    @torch.no_grad()
    def encode_from_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Cached scaled VAE latents → (tokens, pooled)."""
        return self.vit(latents.to(self.device, self.dtype))

    @torch.no_grad()
    def forward_features(self, images: Tensor, layer: int = -1) -> Tensor:
        """Hidden states ``[B,N,D]`` after block ``layer`` (0-based, negative from the end; -2 = penultimate
        block, LLaVA's ``mm_vision_select_layer``); ``-1`` = ``z_u`` (last block + final norm)."""
        return self.vit.forward_features(self.encode_latents(images).to(self.dtype), layer)

    @torch.no_grad()
    def decode_latents(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Tokens ``[B,N,D]`` → scaled VAE latents via the ViT decoder (τ = 0: no noise)."""
        if self.decoder is None:
            raise RuntimeError("this encoder export has no ViT decoder (e.g. converted from an official OV3 "
                               "checkpoint, which ships none): decode() is unavailable")
        return self.decoder(tokens.to(self.device, self.dtype), grid)

    @torch.no_grad()
    def decode(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Tokens ``[B,N,D]`` → images ``[B,3,H,W]`` clamped to [-1, 1]."""
        return self.vae.decode(self.decode_latents(tokens, grid)).float().clamp(-1, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode(images)


# ----------------------------------------------------------------------------- writing
def build_config(vit_cfg: ViTConfig, dec_cfg: DecoderConfig | None, vae: FrozenVAE, image_size: int, tau: float,
                 vae_path: str = "vae", vae_config: str | None = None, extra: dict | None = None) -> dict:
    grid = image_size // (vae.downsample * vit_cfg.patch_size)
    return {
        "format": FORMAT, "version": VERSION,
        "image_size": image_size, "patch_size": vit_cfg.patch_size, "grid_size": grid,
        "num_tokens": grid * grid, "width": vit_cfg.width, "embed_dim": vit_cfg.embed_dim,
        "latent_size": image_size // vae.downsample, "tau": float(tau),
        "encoder": vit_cfg.to_dict(), "decoder": dec_cfg.to_dict() if dec_cfg is not None else None,
        "vae": {"path": vae_path, "config": vae_config, **vae.reference()},
        **(extra or {}),
    }


def export_encoder(out_dir: str | os.PathLike, vit: LatentViT, decoder: ViTDecoder | None, vae: FrozenVAE,
                   image_size: int, tau: float, copy_vae: bool = True, vae_source: str | None = None,
                   vae_config: str | None = None, extra: dict | None = None) -> Path:
    """Write the export folder atomically (temp dir + rename). ``copy_vae`` stores the VAE as ``vae/``
    (diffusers layout); otherwise ``vae_source`` (an absolute local path) is referenced."""
    out = Path(out_dir)
    if not copy_vae and not vae_source:
        raise ValueError("export_encoder: copy_vae=False needs vae_source (a local VAE path)")
    vae_path = "vae" if copy_vae else str(Path(vae_source).resolve())
    dec_cfg = decoder.cfg if decoder is not None else None
    cfg = build_config(vit.cfg, dec_cfg, vae, image_size, tau, vae_path, None if copy_vae else vae_config, extra)

    def write(tmp: Path) -> None:
        tensors = {f"encoder.{k}": v for k, v in vit.state_dict().items()}
        if decoder is not None:
            tensors.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if copy_vae:
            vae.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    return _write_folder(out, write)


def _write_folder(out: Path, write) -> Path:
    """``write(tmp)`` fills a temp folder beside ``out``, which then replaces ``out`` (rename: atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_random_export(out_dir: str | os.PathLike, size: str = "tiny", image_size: int = 64, seed: int = 0,
                        tau: float = 0.8) -> Path:
    """A random ViT + random tiny VAE export so sibling tests run before the encoder is trained."""
    vae = FrozenVAE(build_random_vae(tiny_vae_config(), seed=seed), scaling_factor=1.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vcfg = vit_config(size, in_channels=vae.latent_channels)
        vit = LatentViT(vcfg)
        dec = ViTDecoder(decoder_config_for(vcfg))
    return export_encoder(out_dir, vit, dec, vae, image_size, tau, extra={"note": "random weights (tests only)"})


# ----------------------------------------------------------------------------- loading
def _split(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, sd: dict[str, Tensor], what: str, path: Path) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: {what} weights do not match config.json: missing keys {sorted(missing)}, "
                       f"unexpected keys {sorted(unexpected)}")


def read_export_config(path: str | os.PathLike) -> dict:
    """An export folder's ``config.json`` (checked: the format and the keys a loader needs), without the weights."""
    cfg_path = Path(path) / "config.json"
    cfg = read_format_json(cfg_path, FORMAT, "encoder export")
    for key in ("encoder", "decoder", "vae", "image_size"):
        if key not in cfg:
            raise KeyError(f"{cfg_path}: missing key {key!r}")
    return cfg


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> FrozenEncoder:
    """Load an export folder → :class:`FrozenEncoder` (eval, no grad) on ``device`` in ``dtype``."""
    root = Path(path)
    cfg_path, w_path = root / "config.json", root / "model.safetensors"
    for p in (root, cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"encoder export: missing {p}")
    cfg = read_export_config(root)
    vae_ref = cfg["vae"]
    if "path" not in vae_ref:
        raise KeyError(f"{cfg_path}: missing key 'vae.path'")
    vae_src = Path(vae_ref["path"])
    vae_src = vae_src if vae_src.is_absolute() else root / vae_src
    if not vae_src.exists():
        raise FileNotFoundError(f"{cfg_path}: vae.path does not exist: {vae_src}")
    vae = load_frozen_vae(vae_src, vae_ref.get("config"), vae_ref.get("scaling_factor"),
                          vae_ref.get("shift_factor", 0.0))
    vit = LatentViT(ViTConfig.from_dict(cfg["encoder"]))
    dec = ViTDecoder(DecoderConfig.from_dict(cfg["decoder"])) if cfg["decoder"] is not None else None
    sd = load_file(str(w_path))
    _load_strict(vit, _split(sd, "encoder."), "encoder", w_path)
    if dec is not None:
        _load_strict(dec, _split(sd, "decoder."), "decoder", w_path)
    elif _split(sd, "decoder."):
        raise KeyError(f"{w_path}: has decoder.* weights but config.json says decoder: null")
    return FrozenEncoder(vit, dec, vae, cfg).to(device=device, dtype=dtype)


def _run_state(run_dir: str | os.PathLike, checkpoint: str | None = None):
    """(config, model state dict) of a training run: its ``config.yaml`` + the latest valid (or given) checkpoint.

    The config is the file as saved by the trainer with the parts an export builds from typed and closed
    (``model``, ``loss``, ``vae``: an unknown or mistyped key there is an error naming it), so exporting does not
    import the training stack."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--run: missing {cfg_path} (not a training run folder?)")
    cfg = OmegaConf.load(cfg_path)
    for key, schema in (("model", ModelConfig), ("loss", LossConfig), ("vae", VAEConfig)):
        typed = OmegaConf.structured(schema)
        OmegaConf.set_struct(typed, True)
        try:
            cfg[key] = OmegaConf.merge(typed, cfg.get(key) or {})
        except OmegaConfBaseException as e:
            raise ConfigError(f"{cfg_path}: {key}: {e.msg}") from e
    loaded = CheckpointManager(run / "checkpoints").load(checkpoint)
    if loaded is None:
        raise FileNotFoundError(f"--run: no valid checkpoint under {run / 'checkpoints'}")
    return cfg, loaded[0]["model"]


def export_run(run_dir: str | os.PathLike, out_dir: str | None = None, checkpoint: str | None = None) -> Path:
    """Re-export a training run (its ``config.yaml`` + the latest valid, or the given, checkpoint)."""
    cfg, sd = _run_state(run_dir, checkpoint)
    return export_from_state(sd, cfg, build_vae(cfg.vae, "cpu"), out_dir or str(Path(run_dir) / "export"))


def export_from_state(sd: dict, cfg, vae: FrozenVAE, export_dir: str) -> Path:
    """Export a training run's model state ``sd``; ``cfg``: the run's config (``encoder.train.Config``, or a run's
    ``config.yaml`` read by :func:`_run_state`): its model, loss.tau, vae and last stage's resolution."""
    _, vit, dec = build_vit(cfg.model, vae.latent_channels)
    vit.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vit.")})
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")})
    copy = cfg.vae.random_tiny or Path(cfg.vae.path).is_dir()
    return export_encoder(export_dir, vit, dec, vae.to("cpu"), cfg.train.stages[-1].resolution, cfg.loss.tau,
                          copy_vae=copy, vae_source=None if copy else str(Path(cfg.vae.path).resolve()),
                          vae_config=cfg.vae.config or None, extra={"trained_config": to_dict(cfg)})


# ----------------------------------------------------------------------------- the open_clip layout
OPEN_CLIP_FORMAT = "openvision3-open-clip"
TEXT_TOWER_LEFT_OUT = (
    "left out: our text encoder masks padded positions and pools at the last real token; open_clip 3.3.0's "
    "TextTransformer built from a config attends to padding (use_pad_mask is not a CLIPTextCfg option), so its "
    "outputs would differ")
DECODER_LEFT_OUT = ("left out: the open_clip layout has no ViT decoder (the release ships none); it stays in the "
                    "encoder export folder (decoder.* of model.safetensors)")


def export_open_clip(out_dir: str | os.PathLike, vit: LatentViT, image_size: int, downsample: int,
                     info: dict | None = None) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (the visual tower, ``visual.*``) in the
    layout of the official releases; ``info`` (VAE reference, τ, ...) goes to the config's ``openvision3`` block,
    which open_clip ignores. Raises ``ValueError`` when the layout cannot reproduce ``vit`` (see
    ``encoder.convert.open_clip_from_vit``)."""
    if image_size % downsample:
        raise ValueError(f"image size {image_size} is not a multiple of the VAE's {downsample}x")
    model_cfg, sd, notes = open_clip_from_vit(vit, image_size // downsample)
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},  # [0, 1] → [-1, 1], VAE input
           "openvision3": {
               "format": OPEN_CLIP_FORMAT, "image_size": image_size,
               "input": (f"VAE latents of {image_size} px images in [-1, 1] ({downsample}x down): "
                         "(posterior.mean - shift_factor) * scaling_factor; vision_cfg.image_size is the latent side"),
               "in_channels_note": "vision_cfg.in_channels is the key of OpenVision's open_clip fork; stock "
                                   "open_clip 3.3.0 builds a 3-channel conv1 (encoder.convert.open_clip_visual "
                                   "swaps it)",
               **(info or {}), "text_tower": TEXT_TOWER_LEFT_OUT, "decoder": DECODER_LEFT_OUT, "notes": notes}}

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / OPEN_CLIP_WEIGHT_FILES[0]), metadata={"format": OPEN_CLIP_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

    return _write_folder(Path(out_dir), write)


def open_clip_source(encoder_dir: str | None = None, run_dir: str | None = None,
                     checkpoint: str | None = None) -> tuple[LatentViT, int, int, dict]:
    """(ViT, image size, VAE downsample, info) of an export folder or of a training run's checkpoint."""
    if encoder_dir:
        enc = load_encoder(encoder_dir)
        vae_ref = dict(enc.config["vae"])
        if not Path(vae_ref["path"]).is_absolute():
            vae_ref["path"] = str((Path(encoder_dir) / vae_ref["path"]).resolve())
        info = {"vae": vae_ref, "tau": enc.tau, "source": str(Path(encoder_dir).resolve())}
        return enc.vit, enc.image_size, enc.downsample, info
    cfg, sd = _run_state(run_dir, checkpoint)
    vae = build_vae(cfg.vae, "cpu")
    _, vit, _ = build_vit(cfg.model, vae.latent_channels)
    vit.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vit.")})
    info = {"vae": {"path": str(Path(cfg.vae.path).resolve()) if cfg.vae.path else "", **vae.reference()},
            "tau": cfg.loss.tau, "source": str(Path(run_dir).resolve())}
    return vit.eval(), cfg.train.stages[-1].resolution, vae.downsample, info


def import_open_clip(checkpoint: str | os.PathLike, vae_source: str, out_dir: str | os.PathLike,
                     vae_config: str | None = None, scaling_factor: float = 0.3611, copy_vae: bool = False) -> Path:
    """An official open_clip checkpoint folder (``open_clip_config.json`` + weights) + a local FLUX.1 VAE -> an
    encoder export folder (:func:`encoder.convert.build_converted_vit`; no decoder, τ = 0). ``ValueError`` names
    what does not fit."""
    oc_cfg, sd = load_open_clip_checkpoint(checkpoint)
    conv = build_converted_vit(oc_cfg, sd)
    vae = load_frozen_vae(vae_source, vae_config, scaling_factor=scaling_factor, shift_factor=0.0)
    if vae.latent_channels != conv.vit.cfg.in_channels:
        raise ValueError(f"the tower reads {conv.vit.cfg.in_channels} channels, the VAE gives "
                         f"{vae.latent_channels} (an RGB tower converts with build_converted_vit, but an encoder "
                         "export puts the VAE in front)")
    if conv.input_size % conv.vit.cfg.patch_size:
        raise ValueError(f"input side {conv.input_size} is not a multiple of the patch")
    image_size = conv.input_size * vae.downsample
    out = export_encoder(out_dir, conv.vit, None, vae, image_size, tau=0.0, copy_vae=copy_vae, vae_source=vae_source,
                         vae_config=vae_config, extra={"source": str(Path(checkpoint).resolve()),
                                                       "conversion_notes": conv.notes,
                                                       "skipped_tensors": len(conv.skipped)})
    for n in conv.notes:
        print(f"note: {n}")
    print(f"converted {len(sd) - len(conv.skipped)} visual tensors ({len(conv.skipped)} non-visual skipped), "
          f"{image_size} px → {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a frozen-encoder export folder (docs/design.md §5) from a run, "
                                             "--random, or an official open_clip checkpoint (--from-open-clip), or with "
                                             "--open-clip the visual tower in the official open_clip layout.")
    ap.add_argument("--run", help="training run folder (runs/toy/encoder): export its latest checkpoint")
    ap.add_argument("--checkpoint", default=None, help="a specific checkpoint folder of that run")
    ap.add_argument("--random", metavar="OUT", help="write a RANDOM tiny export here (sibling tests)")
    ap.add_argument("--open-clip", metavar="OUT", help="write open_clip_config.json + open_clip_model.safetensors "
                                                       "here, from --encoder DIR or --run RUN")
    ap.add_argument("--encoder", default=None, help="with --open-clip: an encoder export folder")
    ap.add_argument("--out", default=None, help="export folder (default <run>/export)")
    ap.add_argument("--from-open-clip", metavar="DIR", help="convert this official checkpoint folder "
                    "(open_clip_config.json + weights) and --vae into the export folder --out")
    ap.add_argument("--vae", default=None, help="with --from-open-clip: local FLUX.1 VAE (diffusers folder or "
                                                "ae.safetensors)")
    ap.add_argument("--vae-config", default=None, help="diffusers VAE config.json for a single file (default FLUX.1)")
    ap.add_argument("--scaling-factor", type=float, default=0.3611, help="latents = posterior.mean * this")
    ap.add_argument("--copy-vae", action="store_true", help="copy the VAE into OUT/vae instead of referencing it")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args(argv)
    if a.from_open_clip:
        if not (a.vae and a.out):
            ap.error("--from-open-clip needs --vae VAE and --out OUT")
        for flag, p in (("--from-open-clip", a.from_open_clip), ("--vae", a.vae)):
            if not Path(p).exists():
                raise SystemExit(f"{flag}: path does not exist: {p}")
        try:
            import_open_clip(a.from_open_clip, a.vae, a.out, a.vae_config, a.scaling_factor, a.copy_vae)
        except ValueError as e:
            raise SystemExit(f"--from-open-clip: {e}") from e
    elif a.open_clip:
        if bool(a.encoder) == bool(a.run):
            ap.error("--open-clip needs exactly one of --encoder EXPORT_DIR or --run RUN_DIR")
        vit, size, down, info = open_clip_source(a.encoder, a.run, a.checkpoint)
        try:
            out = export_open_clip(a.open_clip, vit, size, down, info)
        except ValueError as e:
            raise SystemExit(f"--open-clip: {e}") from e
        print(f"{out}: visual tower at {size} px; text tower {TEXT_TOWER_LEFT_OUT}; decoder {DECODER_LEFT_OUT}")
    elif a.random:
        print(write_random_export(a.random, a.size, a.image_size))
    elif a.run:
        print(export_run(a.run, a.out, a.checkpoint))
    else:
        ap.error("give --run RUN_DIR, --random OUT, --from-open-clip DIR or --open-clip OUT")


if __name__ == "__main__":
    main()
