"""Measurements behind the FID / reconstruction-metric claims (issues 14 and 15), in one process.

* ``pipeline``: the rFID pipeline's metric work — PSNR, SSIM, LPIPS of N (original, reconstruction) pairs,
  Inception features of both sets, FID and sFID — in the variants of :data:`VARIANTS`: ``before`` (scikit-image
  image by image, the lpips package's forward, torch-fidelity's Inception module as is), ``now_cold`` (the first
  evaluation on a val set: both sets through the fused Inception), ``now_warm`` (a later one: the originals'
  features from the statistics cache, only the reconstructions through Inception) and ``now_compiled`` (cold,
  torch.compile, compile time included); images/s, speed-ups over ``before`` and the parity of every number.
  The encoder is not part of it: the "reconstructions" are a fixed degradation of the originals (blur + noise).
  ``make bench``'s rFID row (:func:`encoder_bench_rfid`) runs it on the toy val images.
* ``spread``: FID and sFID of one set at Inception batch sizes 1, 7 and 100 (fp32): max - min.
* ``bf16``: the FID shift of bf16 autocast Inception against fp32 (issue 15: bf16 only if below 0.01).

Images: crops of scikit-image's photographs (real photos; no download), flipped and offset per index.

    python -m eval.bench_fid pipeline --n 1000 --size 256 [--out reports/bench_fid.json]   # the acceptance run
    python -m eval.bench_fid spread --n 200
    python -m eval.bench_fid bf16 --n 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data, transform

import eval.rfid as rfid
from eval import fid as F
from eval.inception import DEFAULT_WEIGHTS
from eval.recon import LPIPSMetric, ReconMetrics
from ov3common.bench import machine
from ov3common.checkpoint import atomic_write_text
from ov3common.heap import heap_reuse
from ov3common.images import center_crop_resize, decode_image
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


VARIANTS = {
    "before": "scikit-image PSNR / SSIM image by image, the lpips package's forward, torch-fidelity's Inception "
              "module as is, for both sets (how the pipeline ran before issue 15)",
    "now_cold": "eval.recon in torch over batches; the fused Inception (BN folded, conv + ReLU fused, separable TF "
                "resize, heap reuse) for both sets; the originals' features written to the statistics cache (the "
                "first evaluation on a val set)",
    "now_warm": "as now_cold, the originals' features read from the statistics cache (a later evaluation, e.g. "
                "another checkpoint, on the same val set): only the reconstructions go through Inception",
    "now_compiled": "as now_cold with the BN-folded Inception through torch.compile (inductor, frozen weights), "
                    "compile time included",
}


def _variant(orig: np.ndarray, recs: np.ndarray, weights: str | Path, variant: str, batch_size: int, lpips,
             cache_dir: Path) -> dict:
    """One timed run of the rFID pipeline's metric work (see :data:`VARIANTS`): PSNR, SSIM, LPIPS of every pair,
    Inception features of both sets, FID and sFID."""

    before = variant == "before"
    t0 = time.perf_counter()
    rm = ReconMetrics(lpips, reference=before)
    with heap_reuse(not before):
        for i in range(0, len(orig), batch_size):
            rm.update(_pm1(orig[i:i + batch_size]), _pm1(recs[i:i + batch_size]))
    t_metrics = time.perf_counter() - t0
    if variant == "now_compiled":
        f_r = F.extract(recs, weights, batch_size, desc="inception recs", compile=True)
        f_o = F.extract(orig, weights, batch_size, desc="inception originals", compile=True)
        fs, rs = F.Stats("recs", f_r["pool"], f_r["spatial"]), F.Stats("orig", f_o["pool"], f_o["spatial"])
    else:
        kw = dict(batch_size=batch_size, fused=not before)
        fs = F.load_stats(recs, weights, **kw)
        rs = F.load_stats(orig, weights, cache_dir=None if before else cache_dir, **kw)
        if rs.origin != ("cache" if variant == "now_warm" else "computed"):
            raise RuntimeError(f"{variant}: the originals' statistics came from {rs.origin}")
    t_features = time.perf_counter() - t0 - t_metrics
    for st in (fs, rs):
        if st.mu is None:
            st.mu, st.sigma = F.gaussian_stats(st.features)
            st.mu_s, st.sigma_s = F.gaussian_stats(st.spatial)
    fid = F.frechet_distance(fs.mu, fs.sigma, rs.mu, rs.sigma, features1=fs.features)
    sfid = F.frechet_distance(fs.mu_s, fs.sigma_s, rs.mu_s, rs.sigma_s, features1=fs.spatial)
    total = time.perf_counter() - t0
    res = rm.result(n_boot=1)
    return {"fid": fid, "sfid": sfid, "psnr": res["psnr"], "ssim": res["ssim"], "lpips": res["lpips"],
            "per_image": rm.per_image(), "seconds": total, "seconds_metrics": t_metrics,
            "seconds_features": t_features, "seconds_fid": total - t_metrics - t_features,
            "images_per_s": len(orig) / total, "inception_images": len(recs) + (rs.origin != "cache") * len(orig)}


def bench_pipeline(orig: np.ndarray, recs: np.ndarray | None = None, *, batch_size: int = 50,
                   weights: str | Path = DEFAULT_WEIGHTS, lpips="auto", compile: bool = True,
                   variants: tuple[str, ...] = ("before", "now_cold", "now_warm")) -> dict:
    """The rFID pipeline's metric work on the same pairs (originals uint8 NHWC, reconstructions: ``degrade`` of
    them unless given), one variant after the other in one process, "before" first (the allocator and every cache
    as a fresh process has them); each variant is warmed up on one batch first (weights loaded, oneDNN kernels
    built; not timed; the compiled variant's compilation is timed). ``lpips``: an LPIPSMetric, "auto" (alex) or
    None. Returns the JSON-able report: per variant seconds (metrics / Inception features / FID), images/s (val
    images = pairs per second), the numbers; speed-ups over "before"; the parity of every number with "before"."""

    recs = degrade(orig) if recs is None else recs
    if lpips == "auto":
        lpips = LPIPSMetric("alex", "auto")
    variants = tuple(variants) + (("now_compiled",) if compile and "now_compiled" not in variants else ())
    if "now_warm" in variants and "now_cold" not in variants:
        raise ValueError("now_warm reads the cache now_cold writes: run both")
    out: dict = {"n": len(orig), "image_size": list(orig.shape[1:3]), "batch_size": batch_size,
                 "machine": machine("cpu"), "lpips": lpips.label if lpips is not None else "off",
                 "definitions": {v: VARIANTS[v] for v in variants},
                 "images_per_s_counts": "val images (one original + its reconstruction) per second",
                 "variants": {}, "speedup": {}, "parity": {}}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="ov3_bench_fid_") as tmp:
        warm_cache = Path(tmp) / "warmup_cache"
        for v in variants:
            if v != "now_compiled":  # warm-up: one batch, its own cache (the timed cold run must miss)
                _variant(orig[:batch_size], recs[:batch_size], weights, "now_cold" if v == "now_warm" else v,
                         batch_size, lpips, warm_cache)
                shutil.rmtree(warm_cache, ignore_errors=True)
            log.info("rFID pipeline: %s (%d pairs)", v, len(orig))
            runs[v] = _variant(orig, recs, weights, v, batch_size, lpips, Path(tmp) / "cache")
            out["variants"][v] = {k: x for k, x in runs[v].items() if k != "per_image"}
            out["variants"][v]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    base = runs.get("before")
    for v, r in runs.items():
        if base is None or v == "before":
            continue
        out["speedup"][v] = {"total": base["seconds"] / r["seconds"],
                             "metrics": base["seconds_metrics"] / r["seconds_metrics"],
                             "features": base["seconds_features"] / r["seconds_features"]}
        p = {f"{k}_abs_diff": abs(base[k] - r[k]) for k in ("fid", "sfid", "psnr", "ssim")}
        p["ssim_abs_diff_max_image"] = float(np.abs(base["per_image"]["ssim"] - r["per_image"]["ssim"]).max())
        p["psnr_abs_diff_max_image"] = float(np.abs(base["per_image"]["psnr"] - r["per_image"]["psnr"]).max())
        if lpips is not None:
            p["lpips_abs_diff"] = abs(base["lpips"] - r["lpips"])
            p["lpips_abs_diff_max_image"] = float(np.abs(base["per_image"]["lpips"] - r["per_image"]["lpips"]).max())
        p["same_numbers"] = bool(p["fid_abs_diff"] < 1e-4 and p["ssim_abs_diff_max_image"] < 1e-4)
        out["parity"][v] = p
    if base is not None:
        out["meets_3x"] = {v: s["total"] >= 3.0 and out["parity"][v]["same_numbers"] for v, s in out["speedup"].items()}
    return out


def pipeline_markdown(r: dict) -> str:
    """The report's lines: one table row per variant."""
    head = (f"rFID pipeline metric work, {r['n']} pairs at {r['image_size'][0]} px, batch {r['batch_size']}, "
            f"{r['machine']['threads']} threads (load {r['machine']['load_avg_1m']} at start), LPIPS {r['lpips']}:")
    lines = [head, "", "| variant | s | images/s | × before (metrics / features) | FID | FID diff | "
             "SSIM diff (max per image) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v, x in r["variants"].items():
        s, p = r["speedup"].get(v), r["parity"].get(v)
        lines.append(f"| {v} | {x['seconds']:.1f} | {x['images_per_s']:.2f} | "
                     + (f"**{s['total']:.2f}×** ({s['metrics']:.1f}× / {s['features']:.2f}×)" if s else "1") + " | "
                     + f"{x['fid']:.4f} | " + (f"{p['fid_abs_diff']:.1e} | {p['ssim_abs_diff_max_image']:.1e}"
                                                if p else "— | —") + " |")
    lines += ["", "; ".join(f"{v}: {d}" for v, d in r["definitions"].items()) + "."]
    return "\n".join(lines)


def encoder_bench_rfid(cfg, device: torch.device) -> dict:
    """``make bench``'s rFID row (``encoder.bench`` calls it by name; ``cfg``: its ``BenchConfig``): the rFID
    pipeline's metric work before / now (cold) / now (warm) — :func:`bench_pipeline` — on the first
    ``rfid_max_images`` images of ``rfid_images`` (originals at their size; reconstructions: ``degrade``), on the
    CPU whatever ``device`` is (the comparison is the CPU pipeline's); LPIPS alex (random backbone without local
    weights: timed the same, labelled)."""
    paths = rfid.select_images(cfg.rfid_images, cfg.rfid_max_images)
    imgs = [decode_image(p.read_bytes(), min_side=1) for p in paths]
    size = min(min(im.size) for im in imgs)
    orig = np.stack([np.asarray(center_crop_resize(im, size)) for im in imgs])
    r = bench_pipeline(orig, batch_size=cfg.rfid_batch, weights=cfg.rfid_weights, lpips=LPIPSMetric("alex", "auto"),
                       compile=False)
    r["images"] = str(cfg.rfid_images)
    r["markdown"] = pipeline_markdown(r)
    return r


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
        rows[bs] = {"fid": F.frechet_distance(*F.gaussian_stats(f["pool"]), mu, sg, features1=f["pool"]),
                    "sfid": F.frechet_distance(*F.gaussian_stats(f["spatial"]), mu_s, sg_s, features1=f["spatial"])}
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_fid", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("pipeline", "spread", "bf16"))
    ap.add_argument("--n", type=int, default=0, help="pipeline: 1000, spread: 200, bf16: 300")
    ap.add_argument("--size", type=int, default=0, help="pipeline: 256, spread: 64, bf16: 96")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--no-compile", action="store_true", help="pipeline: leave out the compiled variant")
    ap.add_argument("--no-lpips", action="store_true", help="pipeline: leave LPIPS out")
    ap.add_argument("--reference-module", action="store_true", help="spread: torch-fidelity's module as is")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "pipeline":
        r = bench_pipeline(photo_set(args.n or 1000, args.size or 256), batch_size=args.batch_size,
                           weights=args.weights, lpips=None if args.no_lpips else "auto", compile=not args.no_compile)
        print(pipeline_markdown(r), file=sys.stderr)
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
