"""Frozen-tower features computed once per image (``data.feature_cache``), so training steps skip the tower.

The tower is frozen in every stage, so its output for an image never changes: the cache folder holds
``features.safetensors`` (``[N, T, C]``) and ``index.json`` (image path → row, the tower's fingerprint, the images
that could not be read). A cache built for another tower (export files, layer, feature, aspect, size) is rebuilt;
images not yet in the cache are added. Rank 0 builds it; other ranks wait for it. Meant for small towers and
datasets (the toy world: 20k images × 16 tokens × 128 in 82 MB of bf16); at LLaVA scale leave it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from ov3common.checkpoint import atomic_write_json, load_safetensors, save_safetensors
from ov3common.images import BadSample, SkipStats, decode_image
from ov3common.log import get_logger, progress

log = get_logger("llava_bridge.feature_cache")
FORMAT = "openvision3-llava-feature-cache"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tower_fingerprint(tower) -> str:
    """What the features depend on: the tower's weight files (size + mtime), layer, feature, preprocessing."""
    parts = [type(tower).__name__, str(getattr(tower, "select_layer", "")), str(getattr(tower, "select_feature", ""))]
    proc = tower.processor
    parts += [str(getattr(proc, "size", "")), str(getattr(proc, "aspect", ""))]
    root = Path(getattr(tower, "path", ""))
    for f in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class FeatureCache:
    """``cache[image_path]`` → ``[T, C]`` features (float32); ``KeyError`` for an image that is not cached."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.folder}/index.json is not a LLaVA feature cache (format {meta.get('format')!r})")
        self.fingerprint, self.bad = meta["fingerprint"], dict(meta.get("bad", {}))
        self.index: dict[str, int] = meta["index"]
        self.features = load_safetensors(self.folder / "features.safetensors")["features"] if self.index else None

    def __contains__(self, image) -> bool:
        return str(image) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, image) -> Tensor:
        return self.features[self.index[str(image)]].float()


def _complete(folder: Path, fingerprint: str) -> dict | None:
    try:
        meta = json.loads((folder / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("format") == FORMAT and meta.get("fingerprint") == fingerprint else None


@torch.no_grad()
def build_feature_cache(tower, images: Iterable, folder: str | os.PathLike, batch_size: int = 256,
                        dtype: str = "bfloat16") -> FeatureCache:
    """Cache the tower's features of ``images`` (paths) in ``folder`` (adds the missing ones; rebuilds a stale
    cache). Unreadable images are recorded under ``bad`` with their reason and never retried in this cache."""
    if dtype not in _DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    fp = tower_fingerprint(tower)
    wanted = list(dict.fromkeys(str(p) for p in images))
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # rank 0 builds; wait for an index with this fingerprint that covers every wanted image
        deadline = time.monotonic() + float(os.environ.get("OV3_FEATURE_CACHE_WAIT", "3600"))
        while time.monotonic() < deadline:
            meta = _complete(folder, fp)
            if meta is not None and all(w in meta["index"] or w in meta.get("bad", {}) for w in wanted):
                return FeatureCache(folder)
            time.sleep(2)
        raise TimeoutError(f"rank {rank}: rank 0 did not finish the feature cache {folder} in time")
    meta = _complete(folder, fp)
    old = FeatureCache(folder) if meta is not None else None
    if meta is None and (folder / "index.json").exists():
        log.info("feature cache %s was built for another tower: rebuilding it", folder)
    known = set(old.index) | set(old.bad) if old is not None else set()
    todo = [w for w in wanted if w not in known]
    if not todo and old is not None:
        return old
    feats: list[Tensor] = [old.features] if old is not None and old.features is not None else []
    index = dict(old.index) if old is not None else {}
    bad = dict(old.bad) if old is not None else {}
    stats = SkipStats()
    bar = progress(total=len(todo), desc="feature cache")
    ref = next(tower.parameters())
    for s in range(0, len(todo), batch_size):
        chunk, pix = [], []
        for path in todo[s:s + batch_size]:
            try:
                pix.append(tower.processor(decode_image(Path(path).read_bytes(), stats=stats)))
                chunk.append(path)
            except FileNotFoundError:
                bad[path] = "missing_image"
            except BadSample as e:
                bad[path] = e.reason
        if pix:
            out = tower(torch.stack(pix).to(ref.device, ref.dtype)).to("cpu", _DTYPES[dtype])
            for path in chunk:
                index[path] = len(index)
            feats.append(out)
        bar.update(len(todo[s:s + batch_size]))
    bar.close()
    folder.mkdir(parents=True, exist_ok=True)
    if feats:
        save_safetensors(folder / "features.safetensors", {"features": torch.cat(feats).contiguous()})
    atomic_write_json(folder / "index.json", {"format": FORMAT, "fingerprint": fp, "index": index, "bad": bad,
                                              "dtype": dtype})
    log.info("feature cache %s: %d images cached (%d added), %d unreadable %s", folder, len(index),
             len(todo) - sum(1 for t in todo if t in bad), len(bad), sorted(set(bad.values())))
    return FeatureCache(folder)
