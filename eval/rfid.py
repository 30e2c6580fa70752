"""rFID runner: the val set through a frozen encoder export and back (τ = 0), vs the originals.

Each image is centre-cropped/resized to the export's ``image_size``; ``encode`` gives the tokens, ``decode`` (no
noise: τ = 0 at inference) the reconstruction. Reported: FID (+ sFID, KID, precision/recall) of the
reconstructions against the processed originals (with a bootstrap interval and the sha256 of the originals'
statistics), PSNR, SSIM (Gaussian 11x11 window, sigma 1.5, data range 1 on [0, 1]), LPIPS — batched in torch
(:mod:`eval.recon`) — and a PNG grid (originals on odd rows, reconstructions below them). With ``cache_dir`` the
originals' Inception statistics are cached by content: a later evaluation on the same val set and image size only
runs the reconstructions through Inception.

    python -m eval.rfid --encoder runs/toy/encoder/export --images data/toy/images/val --out runs/eval/rfid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from encoder.export import load_encoder
from eval.fid import DEFAULT_WEIGHTS, compute_metrics, list_images
from eval.recon import LPIPSMetric, ReconMetrics
from ov3common.checkpoint import atomic_write_json
from ov3common.heap import heap_reuse
from ov3common.images import center_crop_resize, decode_image, save_image_grid, to_tensor_pm1, to_uint8
from ov3common.log import progress


def _load_batch(paths: list[Path], size: int) -> torch.Tensor:
    return torch.stack([to_tensor_pm1(center_crop_resize(decode_image(p.read_bytes(), min_side=1), size))
                        for p in paths])


def original_images(paths: list[Path], size: int, batch_size: int = 16) -> np.ndarray:
    """The originals as :func:`reconstruct` scores them (uint8 NHWC at ``size``): the same bytes, hence the same
    Inception cache entry (the key hashes an array's bytes)."""
    return np.concatenate([to_uint8(_load_batch(paths[i:i + batch_size], size)) for i in range(0, len(paths), batch_size)])


def select_images(folder: str | Path, max_images: int = 0) -> list[Path]:
    """The first ``max_images`` images of ``folder`` (sorted; 0 = all)."""
    files = list_images(folder)
    return files[:max_images] if max_images > 0 else files


@torch.no_grad()
def reconstruct(encoder, paths: list[Path], batch_size: int = 16, lpips: LPIPSMetric | None = None,
                grid_images: int = 8) -> tuple[np.ndarray, np.ndarray, dict, torch.Tensor]:
    """(originals uint8 NHWC, reconstructions uint8 NHWC, recon metrics, grid tensor in [-1, 1])."""

    metrics = ReconMetrics(lpips)
    orig, recs, grid_o, grid_r = [], [], [], []
    with heap_reuse():
        for i in progress(range(0, len(paths), batch_size), desc="rfid reconstruct"):
            x = _load_batch(paths[i:i + batch_size], encoder.image_size)
            tokens, _ = encoder.encode(x.to(encoder.device, encoder.dtype))
            rec = encoder.decode(tokens).float().cpu().clamp(-1, 1)
            metrics.update(x, rec)
            orig.append(to_uint8(x))
            recs.append(to_uint8(rec))
            if sum(len(g) for g in grid_o) < grid_images:
                grid_o.append(x)
                grid_r.append(rec)
    o, r = torch.cat(grid_o)[:grid_images], torch.cat(grid_r)[:grid_images]
    rows = [t for k in range(0, len(o), 8) for t in (o[k:k + 8], r[k:k + 8])]
    return np.concatenate(orig), np.concatenate(recs), metrics.result(), torch.cat(rows)


def run_rfid(encoder_dir: str | Path, images: str | Path | list[Path], out_dir: str | Path, *,
             weights: str | Path = DEFAULT_WEIGHTS, max_images: int = 0, batch_size: int = 16,
             lpips: LPIPSMetric | None = None, cache_dir: str | Path | None = None, kid_subsets: int = 20,
             fid_batch_size: int = 32, device: str = "cpu", bootstrap: int = 0, fused: bool = True,
             precision: str = "fp32") -> dict:
    """Reconstruct, score, write ``rfid.json`` and ``recon_grid.png`` into ``out_dir``; returns the result.
    ``bootstrap`` > 0: a 95% interval of rFID over the reconstructions (the originals' statistics fixed)."""

    paths = images if isinstance(images, list) else select_images(images, max_images)
    enc = load_encoder(encoder_dir, device=device)
    orig, recs, rm, grid = reconstruct(enc, paths, batch_size, lpips)
    fid = compute_metrics(recs, orig, weights, cache_dir=cache_dir, kid_subsets=kid_subsets,
                          batch_size=fid_batch_size, isc=False, device=device, bootstrap=bootstrap, fused=fused,
                          precision=precision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid, out / "recon_grid.png", nrow=8,
                    row_labels=["original", "reconstruction"] * (-(-len(grid) // 16)))
    result = {"rfid": fid["fid"], "sfid": fid.get("sfid"), "psnr": rm["psnr"], "ssim": rm["ssim"],
              "lpips": rm["lpips"], "lpips_note": rm["lpips_note"],
              "lpips_random_backbone": rm.get("lpips_random_backbone", False), "intervals": rm["intervals"],
              "fid_interval": fid.get("fid_interval"), "ref_stats_sha256": fid["ref_stats_sha256"],
              "ssim_window": rm["ssim_window"], "ssim_data_range": rm["ssim_data_range"],
              "n": len(paths), "image_size": enc.image_size, "tau": 0.0,
              "encoder": str(encoder_dir), "grid": str(out / "recon_grid.png"), "fid_details": fid}
    atomic_write_json(out / "rfid.json", result)
    return result


def compare_decoders(cfg, export_dir: str | Path, source_dir: str | Path, source_has_decoder: bool,
                     out: str | Path, device) -> dict:
    """rFID + PSNR/SSIM (the harness's protocol) of a new decoder's export and of the source export's own decoder
    (when it has one): ``make rae-decoder``'s comparison (``encoder.train_decoder`` calls it by name; ``cfg``: its
    ``rfid`` section)."""
    paths = select_images(cfg.images, cfg.max_images)
    res = {}
    for name, src in (("", export_dir), ("source/", source_dir)):
        if name and not source_has_decoder:
            continue
        r = run_rfid(src, paths, Path(out) / f"rfid{'_source' if name else ''}", weights=cfg.weights or DEFAULT_WEIGHTS,
                     batch_size=cfg.batch_size, cache_dir=cfg.cache_dir or None, device=str(device))
        res.update({f"{name}rfid": r["rfid"], f"{name}rfid/psnr": r["psnr"], f"{name}rfid/ssim": r["ssim"],
                    f"{name}rfid/n": r["n"]})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.rfid", description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", required=True, help="encoder export folder")
    ap.add_argument("--images", required=True, help="folder of val images")
    ap.add_argument("--out", required=True, help="output folder (rfid.json, recon_grid.png)")
    ap.add_argument("--max-images", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--cache-dir", default="runs/fid_cache")
    ap.add_argument("--lpips-net", default="alex")
    ap.add_argument("--lpips-backbone", default="auto", choices=("auto", "pretrained", "random", "none"))
    ap.add_argument("--lpips-backbone-path", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    lp = None if args.lpips_backbone == "none" else LPIPSMetric(args.lpips_net, args.lpips_backbone,
                                                               args.lpips_backbone_path, args.device)
    r = run_rfid(args.encoder, args.images, args.out, weights=args.weights, max_images=args.max_images,
                 batch_size=args.batch_size, lpips=lp, cache_dir=args.cache_dir or None, device=args.device)
    print(json.dumps({k: v for k, v in r.items() if k != "fid_details"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
