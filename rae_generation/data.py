"""Class-labelled images and their encoder tokens: robust image sources, the latent cache, normalisation.

Sources (map-style datasets returning one dict per index, never raising on bad input):

* :class:`ImageFolderSource` — ``<root>/<class>/<image>`` (torchvision ImageFolder order: sorted class names).
* :class:`TarSource` — webdataset shards (``KEY.jpg|png`` + ``KEY.json`` with ``label`` and ``class_name``).

Bad samples come back as ``{"reason": ...}`` and are counted in :class:`~ov3common.images.SkipStats` by
:func:`collate_images`; decodable odd modes (CMYK, 16-bit, RGBA, palette, grayscale) are converted to RGB and kept.

Latent cache (written by ``rae_generation.cache_latents``)::

    <cache>/meta.json                       # encoder, image size, grid, width, classes, counts, skip counts, shards
    <cache>/shard-r000-00000.safetensors    # tokens [n, N, D], labels [n], index [n] (source index)
    <cache>/stats.safetensors               # float64 sum / sumsq per (position, channel) and the count

:class:`Normalizer` turns those sums into per-position (RAE) or per-channel statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import Dataset

from ov3common.checkpoint import load_safetensors, read_format_json, save_safetensors
from ov3common.images import (
    BadSample,
    SkipStats,
    center_crop_resize,
    decode_image,
    decode_json,
    to_tensor_pm1,
)
from ov3common.shards import index_tar, read_member

__all__ = ["ImageFolderSource", "TarSource", "open_source", "collate_images", "LatentDataset", "Normalizer",
           "CACHE_FORMAT"]

CACHE_FORMAT = "rae-latents"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _load_image(data: bytes | None, image_size: int) -> dict:
    stats = SkipStats()
    try:
        img = decode_image(data, stats=stats)
    except BadSample as e:
        return {"reason": e.reason}
    img = center_crop_resize(img, image_size)
    return {"image": to_tensor_pm1(img), "converted": next(iter(stats.converted), None)}


class ImageFolderSource(Dataset):
    """``root/<class>/<file>``; every non-hidden file under a class folder is a sample (bad ones are skipped)."""

    def __init__(self, root: str | Path, image_size: int):
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder does not exist: {self.root}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"{self.root}: no class sub-folders (expected <root>/<class_name>/<image>)")
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for f in sorted((self.root / name).rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    self.files.append((f, label))
        if not self.files:
            raise FileNotFoundError(f"{self.root}: the class folders hold no files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path, label = self.files[i]
        try:
            data = path.read_bytes()
        except OSError:
            out = {"reason": "missing_image"}
        else:
            out = _load_image(data, self.image_size)
        return {**out, "label": label, "index": i}


class TarSource(Dataset):
    """Webdataset shards: samples grouped by key; the label is ``json["label"]`` (samples without one are skipped,
    reason ``no_label``). A truncated shard contributes the members before the damage (reason ``truncated_shard``)."""

    def __init__(self, shards: list[Path], image_size: int, classes: list[str] | None = None):
        self.image_size = image_size
        self._handles: dict[int, object] = {}
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise FileNotFoundError("TarSource: no .tar shards given")
        self.scan_stats = SkipStats()
        self.samples: list[tuple[int, dict[str, tuple[int, int]]]] = []  # (shard, {ext: (offset, size)})
        names: dict[int, str] = {}
        for si, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            for key, members in index_tar(str(shard), on_error=lambda *_: self.scan_stats.add("truncated_shard")):
                groups.setdefault(key, {}).update(members)
            for _, members in sorted(groups.items()):
                self.samples.append((si, members))
                meta = self._json(si, members)
                if isinstance(meta, dict) and isinstance(meta.get("label"), int) and meta.get("class_name"):
                    names[meta["label"]] = str(meta["class_name"])
        n = max(names, default=-1) + 1
        self.classes = classes or [names.get(i, f"class_{i}") for i in range(n)]

    def _read(self, si: int, span: tuple[int, int]) -> bytes:
        return read_member(str(self.shards[si]), span[0], span[1], self._handles)

    def _json(self, si: int, members: dict) -> dict | None:
        if "json" not in members:
            return None
        try:
            return decode_json(self._read(si, members["json"]))
        except BadSample:
            return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        """The image is decoded first (so its defects are counted with their own reason), then the label read."""
        si, members = self.samples[i]
        ext = next((e for e in _IMAGE_EXTS if e in members), None)
        out = _load_image(self._read(si, members[ext]) if ext else None, self.image_size)
        if "image" not in out:
            return {**out, "label": -1, "index": i}
        try:
            meta = decode_json(self._read(si, members["json"]) if "json" in members else None)
        except BadSample as e:
            return {"reason": e.reason, "label": -1, "index": i}
        label = meta.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(self.classes):
            return {"reason": "no_label", "label": -1, "index": i}
        return {**out, "label": label, "index": i}

    def __getstate__(self) -> dict:  # file handles are per process
        return {**self.__dict__, "_handles": {}}


def open_source(path: str | Path, image_size: int) -> ImageFolderSource | TarSource:
    """An ImageFolder directory, a directory of ``.tar`` shards, or one ``.tar`` file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return TarSource([p], image_size)
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        return TarSource(tars, image_size) if tars else ImageFolderSource(p, image_size)
    raise FileNotFoundError(f"image source does not exist (ImageFolder dir, shard dir or .tar): {p}")


def collate_images(items: list[dict]) -> dict:
    """Stack the good samples; count the bad ones per reason (``stats``) and the RGB conversions."""
    stats = SkipStats()
    good = [it for it in items if "image" in it]
    for it in items:
        if "image" not in it:
            stats.add(it["reason"])
        elif it.get("converted"):
            stats.converted[it["converted"]] += 1
    images = torch.stack([it["image"] for it in good]) if good else torch.zeros(0, 3, 1, 1)
    return {"images": images, "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long), "stats": stats,
            "seen": torch.tensor([it["index"] for it in items], dtype=torch.long)}


# ------------------------------------------------------------------------------------------- latent cache
def read_cache_meta(cache: str | Path) -> dict:
    return read_format_json(Path(cache) / "meta.json", CACHE_FORMAT, "RAE latent cache",
                            "missing or incomplete: run `make cache-rae-latents`")


_ST_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16)}


def _memmap_tensor(path: Path, key: str) -> tuple[np.memmap, torch.dtype | None]:
    """Memory-map one tensor of a safetensors file (header: u64 length + JSON), without reading it."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    if key not in header:
        raise KeyError(f"{path}: no tensor {key!r}")
    info = header[key]
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path}: unsupported dtype {info['dtype']} for {key!r}")
    np_dtype, view = _ST_DTYPES[info["dtype"]]
    begin = 8 + n + info["data_offsets"][0]
    return np.memmap(path, dtype=np_dtype, mode="r", offset=begin, shape=tuple(info["shape"])), view


class LatentDataset(Dataset):
    """A latent cache, memory-mapped (ImageNet-sized caches need not fit in RAM); items are
    ``{"tokens", "label", "index"}``; batched fetches go through ``__getitems__`` (one gather per shard)."""

    def __init__(self, cache: str | Path, flip: bool = False):
        self.root = Path(cache)
        self.meta = read_cache_meta(self.root)
        if flip and not self.meta.get("flip"):
            raise ValueError(f"data.flip: the latent cache {self.root} holds no mirrored tokens; rebuild it with "
                             f"`flip: true` in the cache config (make cache-rae-latents)")
        self._maps: list[tuple[np.memmap, torch.dtype | None]] = []
        self._flip_maps: list[tuple[np.memmap, torch.dtype | None]] = []
        self._mirror: Tensor | None = None  # per sample: read the mirrored tokens this epoch
        labels = []
        for shard in self.meta["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"latent cache {self.root}: shard {path.name} listed in meta.json is missing")
            self._maps.append(_memmap_tensor(path, "tokens"))
            if flip:
                self._flip_maps.append(_memmap_tensor(path, "tokens_flip"))
            with safe_open(str(path), "pt") as f:
                labels.append(f.get_tensor("labels").long())
        if not labels:
            raise ValueError(f"latent cache {self.root} holds no samples")
        self.labels = torch.cat(labels)
        sizes = torch.tensor([len(x) for x in labels])
        self._starts = torch.cumsum(sizes, 0) - sizes
        self.classes: list[str] = list(self.meta["classes"])
        self.num_tokens, self.channels = (int(v) for v in self._maps[0][0].shape[1:])
        self.grid = int(round(self.num_tokens**0.5))

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """With mirrored tokens: each sample is read mirrored with p = 0.5, a function of (seed, epoch, index)."""
        if self._flip_maps:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._mirror = torch.rand(len(self), generator=g) < 0.5

    def _gather(self, ix: Tensor) -> Tensor:
        shard = torch.searchsorted(self._starts, ix, right=True) - 1
        out = torch.empty(len(ix), self.num_tokens, self.channels)
        mirror = self._mirror[ix] if self._mirror is not None else torch.zeros(len(ix), dtype=torch.bool)
        for s in shard.unique().tolist():
            for flipped in (False, True):
                sel = ((shard == s) & (mirror == flipped)).nonzero().squeeze(1)
                if not len(sel):
                    continue
                mm, view = (self._flip_maps if flipped else self._maps)[s]
                rows = torch.from_numpy(np.ascontiguousarray(mm[(ix[sel] - self._starts[s]).numpy()]))
                out[sel] = (rows.view(view) if view is not None else rows).float()
        return out

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self._gather(torch.tensor([i]))[0], "label": int(self.labels[i]), "index": i}

    def __getitems__(self, idx: list[int]) -> dict:
        ix = torch.as_tensor(idx, dtype=torch.long)
        return {"tokens": self._gather(ix), "labels": self.labels[ix], "index": ix}

    def stats_sums(self) -> dict[str, Tensor]:
        return load_safetensors(self.root / "stats.safetensors")


def token_sums(tokens: Tensor) -> dict[str, Tensor]:
    """float64 sum / sumsq over the batch, per (position, channel), and the count."""
    t = tokens.detach().double()
    return {"sum": t.sum(0), "sumsq": t.pow(2).sum(0), "count": torch.tensor(float(t.shape[0]), dtype=torch.float64)}


class Normalizer(nn.Module):
    """``(z − mean) / std`` with statistics per position (``[N, D]``, RAE), per channel (``[D]``) or none."""

    def __init__(self, mean: Tensor, std: Tensor, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    @classmethod
    def from_sums(cls, sums: dict[str, Tensor], kind: str = "position", eps: float = 1e-5) -> Normalizer:
        n = sums["count"].double()
        s, sq = sums["sum"].double(), sums["sumsq"].double()
        if kind == "channel":
            n, s, sq = n * s.shape[0], s.sum(0), sq.sum(0)
        elif kind == "none":
            return cls(torch.zeros(s.shape[-1]), torch.ones(s.shape[-1]), "none")
        elif kind != "position":
            raise ValueError(f"unknown normalisation {kind!r} (expected position | channel | none)")
        if float(n) < 2:
            raise ValueError("normalisation statistics need at least 2 samples")
        mean = s / n
        var = (sq / n - mean.pow(2)).clamp_min(0) * n / (n - 1)
        return cls(mean, (var + eps).sqrt(), kind)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    def save(self, path: str | Path) -> None:
        save_safetensors(path, {"mean": self.mean, "std": self.std}, metadata={"kind": self.kind})

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        t = load_safetensors(path)
        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("kind", "position")
        return cls(t["mean"], t["std"], kind)
