"""Train the toy world's frozen VAE once: ``python -m encoder.toy_vae --config configs/encoder/toy_vae.yaml``.

A small diffusers ``AutoencoderKL`` of the FLUX family (8× down-sampling, 16 latent channels, no quant convs),
trained on random crops of toy train images with L1 + MSE + a tiny KL, then frozen like FLUX: its
``scaling_factor`` is set to 1 / std of the train latents (posterior means) and it is saved in diffusers
layout. Reports val PSNR at full resolution (target ≥ 24 dB) and writes a PNG grid of originals vs recons.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from encoder.evaluate import psnr
from encoder.vae import tiny_vae_config
from ov3common.checkpoint import atomic_write_json
from ov3common.config import parse_cli, path_field, save_config
from ov3common.dist import seed_all
from ov3common.images import BadSample, decode_image, save_image_grid
from ov3common.log import MetricLogger, TrainProgress, get_logger
from ov3common.optim import build_adamw, warmup_cosine


@dataclass
class ToyVAEConfig:
    out_dir: str = "runs/toy/vae"
    data_root: str = path_field("data/toy", "dir")  # uses <root>/images/{train,val}/*.jpg
    seed: int = 0
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 32])
    latent_channels: int = 16
    layers_per_block: int = 1
    norm_num_groups: int = 4
    mid_attention: bool = True  # FLUX's VAE has it; off = a purely convolutional (crop-invariant) VAE
    n_train: int = 4000  # images loaded into memory
    n_val: int = 256
    steps: int = 1200
    batch_size: int = 32
    crop: int = 32  # random crops (the VAE is convolutional); val runs at full resolution
    lr: float = 2e-3
    warmup_steps: int = 30
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    init_logvar: float = -6.0  # initial bias of the encoder's log-variance channels
    sample_posterior: bool = True  # False: decode the posterior mean (an AE with a KL-regularised mean)
    threads: int = 0
    log_every: int = 25
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <out_dir>/tb
    min_psnr: float = 24.0  # a warning (not an error) when val PSNR ends below this


def load_images(folder: Path, n: int) -> torch.Tensor:
    """Up to ``n`` images (sorted by name) as uint8 ``[n,3,H,W]``; undecodable files are skipped."""
    files = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no images in {folder} (run `make data`)")
    out = []
    for f in files:
        if len(out) == n:
            break
        try:
            out.append(np.asarray(decode_image(f.read_bytes())))
        except BadSample as e:
            get_logger(__name__).warning("skipping %s: %s", f, e)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def to_pm1(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def random_crops(images: torch.Tensor, n: int, crop: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(images), (n,), generator=g)
    h, w = images.shape[-2:]
    ys = torch.randint(h - crop + 1, (n,), generator=g).tolist()
    xs = torch.randint(w - crop + 1, (n,), generator=g).tolist()
    out = torch.stack([images[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), ys, xs)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return to_pm1(out)


@torch.no_grad()
def val_psnr(vae: AutoencoderKL, images: torch.Tensor, bs: int = 64) -> tuple[float, torch.Tensor]:
    vals, recs = [], []
    for i in range(0, len(images), bs):
        x = to_pm1(images[i:i + bs])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        vals.append(psnr(rec, x))
        recs.append(rec)
    return float(torch.cat(vals).mean()), torch.cat(recs)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, bs: int = 64) -> float:
    zs = [vae.encode(to_pm1(images[i:i + bs])).latent_dist.mean for i in range(0, len(images), bs)]
    return float(torch.cat(zs).std())


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(ToyVAEConfig, argv, default_config="configs/encoder/toy_vae.yaml")
    log = get_logger("encoder.toy_vae")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    root = Path(cfg.data_root)
    train_imgs = load_images(root / "images" / "train", cfg.n_train)
    val_imgs = load_images(root / "images" / "val", cfg.n_val)
    vcfg = tiny_vae_config(cfg.latent_channels, tuple(cfg.channels), cfg.layers_per_block, cfg.norm_num_groups)
    vcfg["sample_size"] = int(train_imgs.shape[-1])
    vcfg["mid_block_add_attention"] = cfg.mid_attention
    vae = AutoencoderKL.from_config(vcfg)
    with torch.no_grad():  # start with a small posterior std: early sampling noise would drown the signal
        vae.encoder.conv_out.bias[cfg.latent_channels:] = cfg.init_logvar
    opt = build_adamw(vae, cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, 0.05)
    metrics = MetricLogger(out, tensorboard=cfg.tensorboard)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    bar = TrainProgress(cfg.steps, 0, "toy VAE", cfg.log_every, log)
    for step in range(cfg.steps):
        x = random_crops(train_imgs, cfg.batch_size, cfg.crop, g)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g) if cfg.sample_posterior else post.mean
        y = vae.decode(z).sample
        l1, mse, kl = (y - x).abs().mean(), (y - x).square().mean(), post.kl().mean() / x[0].numel()
        loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        due = (step + 1) % cfg.log_every == 0
        bar.update(len(x), loss.item() if due else None)
        if due:
            metrics.log(step + 1, {"l1": l1, "mse": mse, "kl": kl, "lr": sched.get_last_lr()[0],
                                   "samples_per_s": bar.samples_per_s})
    bar.close()
    vae.eval().requires_grad_(False)
    score, recs = val_psnr(vae, val_imgs)
    std = latent_std(vae, train_imgs[:1024])
    vae.register_to_config(scaling_factor=round(1.0 / std, 6), shift_factor=0.0)
    vae.save_pretrained(str(out), safe_serialization=True)
    n = min(8, len(val_imgs))
    save_image_grid(torch.cat([to_pm1(val_imgs[:n]), recs[:n]]), out / "recon_grid.png", nrow=n)
    summary = {"val_psnr": score, "latent_std": std, "scaling_factor": 1.0 / std, "steps": cfg.steps,
               "seconds": time.time() - t0, "params": sum(p.numel() for p in vae.parameters())}
    atomic_write_json(out / "summary.json", summary)
    metrics.log(cfg.steps, summary)
    log.info("toy VAE: val PSNR %.2f dB at %d px, scaling_factor %.4f, %.0f s → %s", score, val_imgs.shape[-1],
             1.0 / std, summary["seconds"], out)
    if score < cfg.min_psnr:
        log.warning("toy VAE val PSNR %.2f dB is below the %.1f dB target: train longer (steps=...)",
                    score, cfg.min_psnr)
    return summary


if __name__ == "__main__":
    main()
