"""Toy-val evaluation of the encoder: image→text retrieval R@1, reconstruction PSNR (τ = 0), a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ov3common.images import save_image_grid


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], computed on [0, 1]."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def retrieval_r1(img_emb: Tensor, txt_emb: Tensor, texts: list[str]) -> tuple[float, float]:
    """Image→text R@1 over the set; a hit is a retrieved text identical to the image's own (toy alt-texts
    repeat). Returns (R@1, chance level of that criterion)."""
    sim = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).t()
    top = sim.argmax(1).tolist()
    hits = sum(texts[j] == texts[i] for i, j in enumerate(top))
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    chance = sum(counts[t] for t in texts) / len(texts) ** 2
    return hits / len(texts), chance


@torch.no_grad()
def evaluate(model, batches: list[dict], grid_path: str | Path | None = None, grid_n: int = 8,
             autocast: bool = False, wrapped=None) -> dict[str, float]:
    """Run ``OV3Model`` (through ``wrapped``, its DDP/FSDP2 wrapper, when given: FSDP2 needs the root forward) over
    pre-collated val batches; every rank computes the same numbers. Restores the training mode."""
    was = model.training
    model.eval()
    fwd = wrapped if wrapped is not None else model
    vae = model.frozen["vae"]
    imgs, txts, texts, ps, l1s, grid_src, grid_rec = [], [], [], [], [], [], []
    dev = next(iter(vae.parameters())).device
    for b in batches:
        b = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in b.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            o = fwd(b, inference=True)
        lat, pred_lat = o["lat"], o["pred_lat"]
        rec = vae.decode(pred_lat.float()).float().clamp(-1, 1)
        imgs.append(o["pooled"].float().cpu())
        txts.append(o["txt"].float().cpu())
        texts += b["alt_text"]
        ps.append(psnr(rec, b["image"]).cpu())
        l1s.append((pred_lat.float() - lat.float()).abs().flatten(1).mean(1).cpu())
        if sum(len(g) for g in grid_src) < grid_n:
            grid_src.append(b["image"].cpu())
            grid_rec.append(rec.cpu())
    model.train(was)
    r1, chance = retrieval_r1(torch.cat(imgs), torch.cat(txts), texts)
    out = {"val/psnr": float(torch.cat(ps).mean()), "val/r1_i2t": r1, "val/r1_chance": chance,
           "val/latent_l1": float(torch.cat(l1s).mean()), "val/n": len(texts)}
    if grid_path is not None and grid_src:
        src, rec = torch.cat(grid_src)[:grid_n], torch.cat(grid_rec)[:grid_n]
        n = src.shape[0]
        save_image_grid(torch.cat([src, rec]), grid_path, nrow=n,
                        row_labels=["original", "reconstruction"])
    return out
