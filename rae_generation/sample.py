"""Sampling: ``make rae-sample`` (ADM npz + labelled PNG grid) and the Python API used by the eval harness.

API (what ``eval``'s gFID runner calls)::

    from rae_generation.sample import load_generator
    gen = load_generator("runs/toy/rae", encoder_export=None, device="cpu")   # EMA weights of the latest checkpoint
    images = gen.sample(labels, steps=50, cfg_scale=1.0, seed=0)   # labels: LongTensor [B] -> [B,3,H,W] in [-1, 1]
    gen.num_classes, gen.class_names, gen.image_size

``load_generator(run_dir, encoder_export=None, device="cpu", checkpoint="latest", weights="ema", guide=None)``:
``encoder_export`` overrides the encoder recorded in the run's ``generator.json``; ``guide`` (a Generator, or a
``(run_dir, checkpoint)`` pair) switches guidance from CFG to AutoGuidance with that weaker model.
``gen.sample(..., method="euler"|"heun", interval=(lo, hi), batch_size=64)``: guidance only for t in [lo, hi].
Samples are a pure function of (weights, labels, seed, settings): the noise of sample i does not depend on the
batch size. ``make rae-sample`` writes a sampling manifest beside the npz (``<stem>.manifest.json``,
:mod:`rae_generation.manifest`: checkpoint hash, EMA/raw, sampler, steps, CFG scale and interval, guidance, class balance,
seed, precision, encoder export hash, decoder settings); :func:`manifest_fields` gives its generator part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from encoder.export import load_encoder as _load_encoder
from ov3common.checkpoint import (
    CheckpointManager,
    atomic_write,
    atomic_write_json,
    load_safetensors,
    save_safetensors,
)
from ov3common.config import parse_cli, save_config
from ov3common.images import save_image_grid, to_uint8
from ov3common.log import get_logger, progress
from rae_generation.config import SampleConfig
from rae_generation.data import Normalizer
from rae_generation.manifest import (
    checkpoint_file_sha256,
    class_balance,
    export_sha256,
    guidance_kind,
    write_manifest,
)
from rae_generation.models import DiTDH, DiTDHConfig
from rae_generation.samplers import guided_velocity, sample_ode

__all__ = ["Generator", "load_generator", "write_npz", "class_grid", "write_preview", "manifest_fields"]
log = get_logger("rae.sample")


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_checkpoint(run: Path, checkpoint: str = "latest") -> Path:
    """``latest`` (newest valid), a step folder name under ``<run>/checkpoints``, or a path."""
    if checkpoint == "latest":
        found = CheckpointManager(run / "checkpoints").latest()
        if found is None:
            raise FileNotFoundError(f"{run}/checkpoints: no valid checkpoint (train first: make rae-train)")
        return Path(found)
    p = Path(checkpoint)
    p = p if p.is_dir() else run / "checkpoints" / checkpoint
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (looked in {run / 'checkpoints'})")
    return p


class Generator:
    """A trained DiT-DH with its normalisation and (optionally) the frozen encoder that decodes tokens."""

    def __init__(self, model: DiTDH, norm: Normalizer, shift: float, class_names: list[str], encoder=None,
                 image_size: int = 0, defaults: dict | None = None, guide: Generator | None = None):
        self.model, self.norm, self.shift = model.eval(), norm, float(shift)
        self.class_names, self.encoder, self.image_size = list(class_names), encoder, image_size
        self.defaults = {"steps": 50, "method": "euler", "cfg_scale": 1.0, "interval": (0.0, 1.0), **(defaults or {})}
        self.guide = guide
        self.checkpoint: Path | None = None  # the weights file (set by load_generator; None for a live model)
        self.weights = "ema"
        self.encoder_path = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noise(self, n: int, seed: int, offset: int = 0) -> Tensor:
        """Starting noise of samples ``offset .. offset + n − 1``; sample i's noise depends on (seed, i) only."""
        cfg = self.model.cfg
        g = torch.Generator()
        return torch.stack([torch.randn(cfg.grid * cfg.grid, cfg.in_dim, generator=g.manual_seed(
            int(seed) * 1_000_003 + offset + i)) for i in range(n)]) if n else torch.zeros(0, 1, cfg.in_dim)

    @torch.no_grad()
    def sample_latents(self, labels: Tensor, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                       method: str | None = None, interval: tuple[float, float] | None = None,
                       batch_size: int = 64, offset: int = 0) -> Tensor:
        """De-normalised tokens ``[B, N, C]`` (CPU, float32) for class ids ``labels``."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        steps = steps or self.defaults["steps"]
        method = method or self.defaults["method"]
        scale = self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        interval = tuple(interval or self.defaults["interval"])
        noise, outs = self.noise(len(labels), seed, offset), []
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size].to(self.device)
            f = guided_velocity(self.model, y, scale, interval, self.guide.model if self.guide else None)
            x = sample_ode(f, noise[i:i + batch_size].to(self.device), steps, method, self.shift)
            outs.append(self.norm.denormalize(x.float()).cpu())
        return torch.cat(outs) if outs else noise

    @torch.no_grad()
    def decode(self, tokens: Tensor, batch_size: int = 64) -> Tensor:
        if self.encoder is None:
            raise RuntimeError("this generator has no encoder to decode tokens (pass encoder_export=...)")
        outs = [self.encoder.decode(tokens[i:i + batch_size].to(self.encoder.device)).float().cpu()
                for i in range(0, len(tokens), batch_size)]
        return torch.cat(outs)

    def sample(self, labels: Tensor, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
               method: str | None = None, interval: tuple[float, float] | None = None,
               batch_size: int = 64, offset: int = 0) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (CPU) for class ids ``labels``; ``offset`` = the index of the first
        sample in a longer run (its noise is drawn from (seed, offset + i))."""
        z = self.sample_latents(labels, steps, cfg_scale, seed, method, interval, batch_size, offset)
        return self.decode(z, batch_size)


def load_generator(run_dir: str | Path, encoder_export: str | Path | None = None, device: str | torch.device = "cpu",
                   checkpoint: str = "latest", weights: str = "ema", guide=None, load_encoder: bool = True
                   ) -> Generator:
    """Load a trained run (see the module docstring)."""
    run, device = Path(run_dir), _device(device)
    spec_path = run / "generator.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} does not exist: is {run} a run folder of rae_generation.train?")
    spec = json.loads(spec_path.read_text())
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = resolve_checkpoint(run, checkpoint)
    model = DiTDH(DiTDHConfig.from_dict(spec["model"]))
    sd = load_safetensors(ckpt / f"{weights}.safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{ckpt}/{weights}.safetensors does not match generator.json: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    model.to(device).eval().requires_grad_(False)
    norm = Normalizer.load(run / "stats.safetensors").to(device)
    enc = None
    enc_path = str(encoder_export or spec.get("encoder") or "")
    if load_encoder and enc_path:
        enc = _load_encoder(enc_path, device=device)
    if isinstance(guide, tuple | list):
        guide = load_generator(guide[0], device=device, checkpoint=guide[1], load_encoder=False)
    s = spec.get("sample", {})
    defaults = {k: s[k] for k in ("steps", "method", "cfg_scale") if k in s}
    if "interval" in s:
        defaults["interval"] = tuple(s["interval"])
    log.info("loaded %s (%s weights, step folder %s)", run, weights, ckpt.name)
    gen = Generator(model, norm, spec["shift"], spec["classes"], enc, spec.get("image_size", 0), defaults, guide)
    gen.checkpoint, gen.weights, gen.encoder_path = ckpt / f"{weights}.safetensors", weights, enc_path
    return gen


def manifest_fields(gen: Generator, steps: int | None = None, cfg_scale: float | None = None,
                    method: str | None = None, interval: tuple[float, float] | None = None,
                    precision: str = "fp32") -> dict:
    """The generator's part of a sampling manifest (:mod:`rae_generation.manifest`), with the run's defaults filled in."""

    scale = gen.defaults["cfg_scale"] if cfg_scale is None else cfg_scale
    enc = gen.encoder
    out = {
        "checkpoint": str(gen.checkpoint) if gen.checkpoint else "<live model>",
        "checkpoint_sha256": checkpoint_file_sha256(gen.checkpoint) if gen.checkpoint else None,
        "weights": gen.weights, "sampler": method or gen.defaults["method"], "steps": steps or gen.defaults["steps"],
        "cfg_scale": float(scale), "cfg_interval": list(interval or gen.defaults["interval"]),
        "guidance": guidance_kind(scale, gen.guide is not None),
        "guide_checkpoint_sha256": checkpoint_file_sha256(gen.guide.checkpoint)
        if gen.guide is not None and gen.guide.checkpoint else None,
        "precision": precision, "num_classes": gen.num_classes,
        "encoder": str(gen.encoder_path), "encoder_sha256": export_sha256(gen.encoder_path) if gen.encoder_path else None,
        "decoder": {"tau": 0.0, "image_size": int(enc.image_size) if enc is not None else gen.image_size,
                    "dtype": str(enc.dtype).replace("torch.", "") if enc is not None else None},
    }
    return out


# ------------------------------------------------------------------------------------------------ outputs
def write_npz(path: str | Path, images: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> None:
    """ADM layout: ``arr_0`` uint8 NHWC, ``arr_1`` int64 labels (atomic write)."""
    arr = to_uint8(images) if isinstance(images, Tensor) else np.asarray(images, dtype=np.uint8)
    lab = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) != len(lab):
        raise ValueError(f"npz: images must be [N,H,W,3] with N labels, got {arr.shape} and {lab.shape}")

    def write(p: str) -> None:
        with open(p, "wb") as f:
            np.savez(f, arr_0=arr, arr_1=lab)

    atomic_write(path, write)


def class_grid(images: Tensor, labels: Tensor, class_names: list[str], path: str | Path, columns: int = 8,
               max_classes: int = 64) -> None:
    """PNG grid, one row per class (up to ``columns`` samples), the class name at the left of its row."""
    rows, names = [], []
    for c in sorted(set(labels.tolist()))[:max_classes]:
        sel = images[labels == c][:columns]
        if len(sel) < columns:
            sel = torch.cat([sel, torch.ones(columns - len(sel), *sel.shape[1:])])
        rows.append(sel)
        names.append(class_names[c].replace("_", " "))
    save_image_grid(torch.cat(rows), path, nrow=columns, row_labels=names)


def write_preview(out: Path, ema: DiTDH, norm: Normalizer, shift: float, data, scfg, device) -> None:
    """End-of-training grid: 4 EMA samples of each of the first 16 classes → ``<out>/preview.png``."""

    enc = data.encoder or _load_encoder(data.encoder_path, device=device)
    gen = Generator(ema, norm, shift, data.classes, enc, data.image_size,
                    {"steps": scfg.steps, "method": scfg.method, "cfg_scale": scfg.cfg_scale,
                     "interval": tuple(scfg.interval)})
    labels = torch.arange(min(16, gen.num_classes)).repeat_interleave(4)
    imgs = gen.sample(labels, seed=1234)
    class_grid(imgs, labels, gen.class_names, out / "preview.png", columns=4)
    log.info("preview grid: %s", out / "preview.png")


def main(argv=None) -> None:
    cfg = parse_cli(SampleConfig, argv, default_config="configs/rae/sample_toy.yaml")
    guide = (cfg.guide_run, cfg.guide_checkpoint) if cfg.guide_run else None
    gen = load_generator(cfg.run, cfg.encoder or None, cfg.device, cfg.checkpoint, cfg.weights, guide)
    if guide is not None and cfg.guide_weights != "ema":
        gen.guide = load_generator(cfg.guide_run, device=cfg.device, checkpoint=cfg.guide_checkpoint,
                                   weights=cfg.guide_weights, load_encoder=False)
    classes = list(cfg.classes) or list(range(gen.num_classes))
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.per_class)
    g = cfg.guidance
    out = Path(cfg.out or Path(cfg.run) / "samples" / "samples.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out.with_suffix(".yaml"))
    images, tokens = [], []
    for i in progress(range(0, len(labels), cfg.batch_size), desc="sample"):
        z = gen.sample_latents(labels[i:i + cfg.batch_size], g.steps, g.cfg_scale, cfg.seed, g.method,
                               tuple(g.interval), cfg.batch_size, offset=i)
        images.append(gen.decode(z, cfg.batch_size))
        if cfg.save_tokens:
            tokens.append(z)
    imgs = torch.cat(images)
    write_npz(out, imgs, labels)
    if cfg.save_tokens:
        save_safetensors(out.with_name(out.stem + "_tokens.safetensors"), {"tokens": torch.cat(tokens),
                                                                          "labels": labels})
    grid = out.with_name(out.stem + "_grid.png")
    class_grid(imgs, labels, gen.class_names, grid, cfg.grid_columns, cfg.grid_max_classes)
    atomic_write_json(out.with_name(out.stem + "_info.json"), {
        "npz": str(out), "grid": str(grid), "num_samples": len(labels), "per_class": cfg.per_class,
        "classes": [gen.class_names[c] for c in classes], "guidance": "autoguidance" if guide else "cfg",
        "steps": g.steps, "method": g.method, "cfg_scale": g.cfg_scale, "interval": list(g.interval)})

    balance, per = class_balance(labels.tolist())
    write_manifest(out, {**manifest_fields(gen, g.steps, g.cfg_scale, g.method, tuple(g.interval)),
                         "per_class": per, "num_samples": len(labels), "class_balance": balance,
                         "classes": [gen.class_names[c] for c in classes], "seed": cfg.seed,
                         "written_by": "rae_generation.sample"})
    log.info("wrote %s (%d samples), its manifest and %s", out, len(labels), grid)


if __name__ == "__main__":
    main()
