"""Measurements behind the FID / reconstruction-metric claims (issues 14 and 15), in one process.

* ``pipeline``: the rFID pipeline — Inception features of N originals and N reconstructions, FID, PSNR, SSIM,
  LPIPS — the way it ran before (scikit-image PSNR / SSIM image by image; torch-fidelity's Inception module as is)
  and now (:mod:`eval.recon` in torch over batches; the BN-folded channels_last extractor), on the same images,
  with the numbers of both (FID, SSIM, PSNR, LPIPS differences) and images/s. The encoder is not part of it: the
  "reconstructions" are a fixed degradation of the originals (blur + noise), so only the metric work is timed.
* ``spread``: FID and sFID of one set at Inception batch sizes 1, 7 and 100 (fp32): max - min.
* ``bf16``: the FID shift of bf16 autocast Inception against fp32 (issue 15: bf16 only if below 0.01).

Images: crops of scikit-image's photographs (real photos; no download), flipped and offset per index.
:func:`rfid_pipeline_images_per_s` is the entry point ``make bench`` calls.

    python -m eval.bench_fid pipeline --n 1000 --size 256 [--out reports/bench_fid.json]
    python -m eval.bench_fid spread --n 200
    python -m eval.bench_fid bf16 --n 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data, transform

import eval.rfid as rfid
from encoder.export import write_random_export
from eval import fid as F
from eval.inception import DEFAULT_WEIGHTS
from eval.recon import LPIPSMetric, ReconMetrics
from ov3common.checkpoint import atomic_write_text
from ov3common.log import get_logger

log = get_logger("eval.bench_fid")


def photo_set(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """n uint8 NHWC crops (``size`` px) of scikit-image's colour photographs, flipped / offset per index."""

    names = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
             "motorcycle_left", "colorwheel", "logo")
    photos = []
    for name in names:
        img = getattr(data, name, None)
        if img is None:
            continue
        a = np.asarray(img())
        if a.ndim == 3 and a.shape[2] >= 3:
            a = a[..., :3]
            if min(a.shape[:2]) < size + 8:
                a = (transform.resize(a, (size + 64, size + 64), anti_aliasing=True) * 255).astype(np.uint8)
            photos.append(a)
    g = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = g.integers(0, p.shape[0] - size + 1), g.integers(0, p.shape[1] - size + 1)
        c = p[y:y + size, x:x + size]
        out[i] = c[:, ::-1] if (i // len(photos)) % 2 else c
    return out


def degrade(images: np.ndarray, seed: int = 1) -> np.ndarray:
    """A fixed stand-in for reconstructions: 3x3 box blur + Gaussian noise (sigma 6 levels), uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    g = torch.Generator().manual_seed(seed)
    x = (x + 6.0 * torch.randn(x.shape, generator=g)).round().clamp(0, 255)
    return x.byte().permute(0, 2, 3, 1).numpy()


def _pm1(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1


def rfid_pipeline(orig: np.ndarray, recs: np.ndarray, weights: str | Path = DEFAULT_WEIGHTS, *, fast: bool = True,
                  batch_size: int = 50, lpips=None, compile: bool = False) -> dict:
    """The metric work of rFID on (originals, reconstructions): features of both, FID, PSNR, SSIM, LPIPS.
    ``fast=False`` is how it ran before this change (scikit-image per image, torch-fidelity's module as is)."""

    t0 = time.perf_counter()
    rm = ReconMetrics(lpips, reference=not fast)
    for i in range(0, len(orig), batch_size):
        rm.update(_pm1(orig[i:i + batch_size]), _pm1(recs[i:i + batch_size]))
    t_recon = time.perf_counter() - t0
    fr = F.extract(recs, weights, batch_size, fused=fast, desc="inception recs", compile=compile)
    fo = F.extract(orig, weights, batch_size, fused=fast, desc="inception originals", compile=compile)
    t_feat = time.perf_counter() - t0 - t_recon
    mu_r, s_r = F.gaussian_stats(fr["pool"])
    mu_o, s_o = F.gaussian_stats(fo["pool"])
    fid = F.frechet_distance(mu_r, s_r, mu_o, s_o, features1=fr["pool"])
    total = time.perf_counter() - t0
    res = rm.result(n_boot=1)
    return {"fid": fid, "psnr": res["psnr"], "ssim": res["ssim"], "lpips": res["lpips"],
            "per_image_ssim": np.concatenate(rm.values["ssim"]), "seconds": total, "seconds_metrics": t_recon,
            "seconds_features": t_feat, "images_per_s": len(orig) / total}


def bench_pipeline(n: int = 1000, size: int = 256, batch_size: int = 50, weights: str | Path = DEFAULT_WEIGHTS,
                   with_lpips: bool = True, compile: bool = True) -> dict:
    """Before vs now on the same n images, in one process ("now" first, so warm-up favours "before"); with
    ``compile`` also "now" with the compiled extractor (compile time included)."""

    orig = photo_set(n, size)
    recs = degrade(orig)
    lp = LPIPSMetric("alex", "auto") if with_lpips else None
    now = rfid_pipeline(orig, recs, weights, fast=True, batch_size=batch_size, lpips=lp)
    before = rfid_pipeline(orig, recs, weights, fast=False, batch_size=batch_size, lpips=lp)
    out = {"n": n, "size": size, "batch_size": batch_size, "threads": torch.get_num_threads(),
           "lpips": lp.label if lp else None}
    runs = [("before", before), ("now", now)]
    if compile:
        comp = rfid_pipeline(orig, recs, weights, fast=True, batch_size=batch_size, lpips=lp, compile=True)
        runs.append(("now_compiled", comp))
        out["speedup_compiled"] = before["seconds"] / comp["seconds"]
        out["fid_abs_diff_compiled"] = abs(before["fid"] - comp["fid"])
    for name, r in runs:
        out[name] = {k: v for k, v in r.items() if k != "per_image_ssim"}
    out["speedup"] = before["seconds"] / now["seconds"]
    out["speedup_features"] = before["seconds_features"] / now["seconds_features"]
    out["speedup_metrics"] = before["seconds_metrics"] / now["seconds_metrics"]
    out["fid_abs_diff"] = abs(before["fid"] - now["fid"])
    out["ssim_abs_diff_mean"] = abs(before["ssim"] - now["ssim"])
    out["ssim_abs_diff_max_image"] = float(np.abs(before["per_image_ssim"] - now["per_image_ssim"]).max())
    out["psnr_abs_diff"] = abs(before["psnr"] - now["psnr"])
    if lp is not None:
        out["lpips_abs_diff"] = abs(before["lpips"] - now["lpips"])
    return out


def rfid_pipeline_images_per_s(n: int = 200, size: int = 256, batch_size: int = 50,
                               weights: str | Path = DEFAULT_WEIGHTS, fast: bool = True) -> float:
    """Images/s of the rFID pipeline's metric work (for ``make bench``)."""
    orig = photo_set(n, size)
    return rfid_pipeline(orig, degrade(orig), weights, fast=fast, batch_size=batch_size)["images_per_s"]


def bench_spread(n: int = 200, size: int = 64, batch_sizes: tuple[int, ...] = (1, 7, 100),
                 weights: str | Path = DEFAULT_WEIGHTS, fused: bool = True) -> dict:
    """FID / sFID of n generated-looking images vs n others at each Inception batch size (fp32)."""

    fake, real = degrade(photo_set(n, size, seed=0)), photo_set(n, size, seed=1)
    ref = F.extract(real, weights, 100, fused=fused)
    mu, sg = F.gaussian_stats(ref["pool"])
    mu_s, sg_s = F.gaussian_stats(ref["spatial"])
    rows = {}
    for bs in batch_sizes:
        f = F.extract(fake, weights, bs, fused=fused)
        rows[bs] = {"fid": F.frechet_distance(*F.gaussian_stats(f["pool"]), mu, sg),
                    "sfid": F.frechet_distance(*F.gaussian_stats(f["spatial"]), mu_s, sg_s)}
    fids, sfids = [r["fid"] for r in rows.values()], [r["sfid"] for r in rows.values()]
    return {"n": n, "fused": fused, "by_batch_size": rows, "fid_spread": max(fids) - min(fids),
            "sfid_spread": max(sfids) - min(sfids)}


def bench_bf16(n: int = 300, size: int = 96, weights: str | Path = DEFAULT_WEIGHTS) -> dict:
    """FID of one pair of sets with fp32 and with bf16 Inception; the shift decides (issue 15: < 0.01)."""

    a, b = photo_set(n, size, seed=0), photo_set(n, size, seed=1)
    out = {"n": n}
    for prec in ("fp32", "bf16"):
        t = time.perf_counter()
        fa, fb = F.extract(a, weights, 50, precision=prec), F.extract(b, weights, 50, precision=prec)
        out[prec] = {"fid": F.frechet_distance(*F.gaussian_stats(fa["pool"]), *F.gaussian_stats(fb["pool"])),
                     "seconds": time.perf_counter() - t}
    out["shift"] = out["bf16"]["fid"] - out["fp32"]["fid"]
    out["bf16_allowed"] = abs(out["shift"]) < 0.01
    return out


def encoder_bench_rfid(cfg, device: torch.device) -> dict:
    """``make bench-encoder rfid=true``'s row (``encoder.bench`` calls it by name; ``cfg``: its ``BenchConfig``):
    images/s of eval's rFID pipeline (reconstruct, Inception features, FID, PSNR, SSIM, LPIPS), called through its
    public ``eval.rfid.run_rfid``; one timed run after a warm-up call on a few images."""


    tmp = Path(tempfile.mkdtemp(prefix="ov3_bench_rfid_"))
    enc = Path(cfg.rfid_encoder)
    trained = (enc / "config.json").is_file()
    if not trained:
        enc = write_random_export(tmp / "export", image_size=64)
    paths = rfid.select_images(cfg.rfid_images, cfg.rfid_max_images)
    lp = None
    try:
        lp = rfid.LPIPSMetric("alex", "auto", "", str(device))
    except (FileNotFoundError, RuntimeError, ValueError) as e:  # no LPIPS weights at all: time the rest
        log.warning("rFID bench without LPIPS: %s", e)
    kw = dict(weights=cfg.rfid_weights, batch_size=cfg.rfid_batch, lpips=lp, cache_dir=None, device=str(device))
    rfid.run_rfid(enc, paths[: min(len(paths), 2 * cfg.rfid_batch)], tmp / "warm", **kw)
    t0 = time.perf_counter()
    r = rfid.run_rfid(enc, paths, tmp / "run", **kw)
    secs = time.perf_counter() - t0
    return {"images": len(paths), "seconds": secs, "images_per_s": len(paths) / secs,
            "encoder": str(cfg.rfid_encoder) if trained else "random tiny export (timing only)",
            "image_size": r["image_size"], "lpips": "off" if lp is None else r.get("lpips_note", "on"),
            "rfid": r["rfid"], "psnr": r["psnr"], "ssim": r["ssim"],
            "pipeline": f"{rfid.__name__}.run_rfid (eval's pipeline as of this run)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_fid", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("pipeline", "spread", "bf16"))
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--reference-module", action="store_true", help="spread: torch-fidelity's module as is")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.what == "pipeline":
        r = bench_pipeline(args.n or 1000, args.size or 256, args.batch_size, args.weights)
    elif args.what == "spread":
        r = bench_spread(args.n or 200, args.size or 64, weights=args.weights, fused=not args.reference_module)
    else:
        r = bench_bf16(args.n or 300, args.size or 96, args.weights)
    text = json.dumps(r, indent=2, default=float)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
