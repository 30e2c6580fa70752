"""Image-text data for the encoder: webdataset tar shards (DataComp convention) read by random access.

Each shard is indexed once (member offsets), so the data are a map-style dataset: the epoch order comes from
``ov3common.data.ResumableSampler`` and a resumed run continues at the exact sample. A sample ``KEY`` is the
group of members ``KEY.<ext>``; fields are named by spec: ``"jpg;png"`` (first present extension),
``"txt"`` (a member) or ``"json:recaption"`` (a field of ``KEY.json``). Bad samples never raise: they come back
as ``{"bad": reason}`` and the collate function drops and counts them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ov3common.config import path_field
from ov3common.images import (
    BadSample,
    SkipStats,
    center_crop_resize,
    decode_image,
    decode_json,
    decode_text,
    to_tensor_pm1,
)


@dataclass
class DataConfig:
    """Where the image-text pairs come from."""

    root: str = path_field("data/toy", "dir")  # toy world root: shards under wds/<split>/
    train_shards: str = ""  # glob/brace pattern of .tar files; empty: <root>/wds/train/*.tar
    val_shards: str = ""  # empty: <root>/wds/val/*.tar
    tokenizer: str = path_field("", "dir")  # HF tokenizer folder; empty: <root>/tokenizer
    image_field: str = "jpg;jpeg;png;webp"
    alt_field: str = "txt"  # web alt-text (DataComp: KEY.txt)
    recap_field: str = "json:recaption"  # long recaption (Recap-DataComp: a field of KEY.json)
    recap_fallback: bool = True  # a sample without a recaption uses its alt-text (counted as recap_from_alt)
    max_text_len: int = 64
    num_workers: int = 0
    latent_cache: str = path_field("", "dir")  # folder from `python -m encoder.cache_latents`; empty = on the fly
    val_size: int = 256


def expand_braces(pattern: str) -> list[str]:
    """``a{000..003}.tar`` / ``a{x,y}.tar`` brace expansion, then glob."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m:
        body = m.group(1)
        if ".." in body:
            lo, hi = body.split("..")
            opts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            opts = body.split(",")
        return [p for o in opts for p in expand_braces(pattern[: m.start()] + o + pattern[m.end():])]
    return sorted(glob.glob(os.path.expanduser(pattern)))


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest (lowercased)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {ext: (offset, size)})]`` in file order. A truncated shard keeps the samples read so far."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile():
                    key, ext = split_key(m.name)
                    samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError):
        pass  # the members indexed before the damage are still usable
    return list(samples.items())


class TarIndex:
    """Random-access index over a list of shards (built once, cached as JSON when ``cache`` is given)."""

    def __init__(self, shards: list[str], cache: str | None = None):
        if not shards:
            raise FileNotFoundError("no .tar shards matched")
        self.shards = [str(Path(s).resolve()) for s in shards]
        data = None
        if cache and Path(cache).is_file():
            data = json.loads(Path(cache).read_text())
            if data.get("shards") != self.shards:
                data = None
        if data is None:
            data = {"shards": self.shards, "samples": []}
            for si, s in enumerate(self.shards):
                data["samples"] += [[si, key, members] for key, members in index_shard(s)]
            if cache:
                from ov3common.checkpoint import atomic_write_json

                atomic_write_json(cache, data)
        self.samples = [(int(si), key, {e: tuple(v) for e, v in m.items()}) for si, key, m in data["samples"]]
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        """(key, {ext: bytes}) of sample ``i``; a member cut short by truncation reads as fewer bytes."""
        if os.getpid() != self._pid:  # forked into a DataLoader worker: reopen files
            self._files, self._pid = {}, os.getpid()
        si, key, members = self.samples[i]
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.shards[si], "rb")  # noqa: SIM115 (kept open for random access)
        out = {}
        for ext, (off, size) in members.items():
            f.seek(off)
            out[ext] = f.read(size)
        return key, out

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_files"] = {}
        return d


def get_field(members: dict[str, bytes], spec: str, cache: dict) -> bytes | str | None:
    """Resolve a field spec against a sample's members (``json:...`` parses KEY.json once, may raise)."""
    if spec.startswith("json:"):
        if "json" not in cache:
            cache["json"] = decode_json(members.get("json"))
        value = cache["json"]
        for part in spec[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value if value is None or isinstance(value, str) else json.dumps(value)
    for ext in spec.split(";"):
        if ext in members:
            return members[ext]
    return None


def sentences(text: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return parts or [text]


class Tokenize:
    """HF tokenizer → ``[<s>] + ids + [</s>]`` truncated to ``max_len`` (pickles into workers)."""

    def __init__(self, tokenizer_dir: str, max_len: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.max_len = max_len
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.cls_token_id
        self.eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        if self.bos is None or self.eos is None:
            raise ValueError(f"tokenizer {tokenizer_dir}: needs bos/eos (or cls/sep) tokens")

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def __call__(self, text: str) -> Tensor:
        ids = self.tok.encode(text, add_special_tokens=False)[: self.max_len - 2]
        return torch.tensor([self.bos, *ids, self.eos], dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad, self.bos, self.eos)], skip_special_tokens=True)


class ImageTextDataset(Dataset):
    """Map-style image-text pairs. ``item(i)`` → dict(image | latent, alt, recap, sent, index, key) or bad."""

    def __init__(self, index: TarIndex, tokenize: Tokenize, resolution: int, cfg: DataConfig, seed: int = 0,
                 latents: LatentCache | None = None):
        self.index, self.tokenize, self.resolution, self.cfg, self.seed = index, tokenize, resolution, cfg, seed
        self.latents = latents
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        try:
            key, members = self.index.read(i)
            cache: dict = {}
            alt = decode_text(get_field(members, self.cfg.alt_field, cache), "caption")
            recap_raw = get_field(members, self.cfg.recap_field, cache)
            out = {"index": i, "key": key, "converted": []}
            if recap_raw is None and self.cfg.recap_fallback:
                recap_raw = alt
                out["converted"].append("recap_from_alt")
            recap = decode_text(recap_raw, "caption")
            if self.latents is not None:
                lat = self.latents.get(i, self.resolution)
                if lat is None:
                    raise BadSample("not_an_image", "marked bad in the latent cache")
                out["latent"] = lat
            conv = SkipStats()
            img = decode_image(get_field(members, self.cfg.image_field, cache), stats=conv)
            out["converted"] += list(conv.converted)
        except BadSample as e:
            return {"bad": e.reason, "index": i}
        out["image"] = to_tensor_pm1(center_crop_resize(img, self.resolution))
        # one random sentence of the recaption for the second contrastive pair (CLIPS); keyed by (seed, epoch, i)
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        out.update(alt=self.tokenize(alt), recap=self.tokenize(recap), sent=self.tokenize(rng.choice(sentences(recap))))
        out["alt_text"] = alt
        return out


def pad_ids(seqs: list[Tensor], pad: int) -> Tensor:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), pad, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, : len(s)] = s
    return out


class Collate:
    """Drop bad samples (counted per reason in ``batch['skipped']``) and pad the text."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        good = [x for x in items if "bad" not in x]
        skipped: dict[str, int] = {}
        for x in items:
            if "bad" in x:
                skipped[x["bad"]] = skipped.get(x["bad"], 0) + 1
        converted: dict[str, int] = {}
        for x in good:
            for c in x["converted"]:
                converted[c] = converted.get(c, 0) + 1
        batch: dict = {"skipped": skipped, "converted": converted, "n_drawn": len(items), "n": len(good)}
        if not good:
            return batch
        batch["index"] = torch.tensor([x["index"] for x in good])
        batch["image"] = torch.stack([x["image"] for x in good])
        if "latent" in good[0]:
            batch["latent"] = torch.stack([x["latent"] for x in good])
        for k in ("alt", "recap", "sent"):
            batch[k] = pad_ids([x[k] for x in good], self.pad_id)
        batch["alt_text"] = [x["alt_text"] for x in good]
        return batch


class LatentCache:
    """Read-only cached VAE latents written by ``encoder.cache_latents``: ``<dir>/meta.json`` and chunks
    ``latents_<res>_<k>.safetensors`` (``latents [n,C,h,w]``, ``valid [n]``; False = the sample failed to
    decode), row ``i`` of the dataset in chunk ``i // chunk_size``. The shards must match the run's."""

    def __init__(self, folder: str, index: TarIndex):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"data.latent_cache: missing {meta_path} (run `make cache-latents`)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("shards") != index.shards:
            raise ValueError(f"data.latent_cache {folder}: written for other shards than this run's")
        self._open: dict = {}

    def _chunk(self, res: int, k: int):
        from safetensors import safe_open

        h = self._open.get((res, k))
        if h is None:
            path = self.folder / f"latents_{res}_{k:05d}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"data.latent_cache: missing {path}")
            h = safe_open(str(path), "pt")
            h = self._open[(res, k)] = (h, h.get_tensor("valid"))
        return h

    def get(self, i: int, res: int) -> Tensor | None:
        if res not in self.meta["resolutions"]:
            raise KeyError(f"data.latent_cache {self.folder} has no {res} px latents "
                           f"(has {self.meta['resolutions']})")
        k, j = divmod(i, int(self.meta["chunk_size"]))
        h, valid = self._chunk(res, k)
        if not bool(valid[j]):
            return None
        return h.get_slice("latents")[j : j + 1][0].float()

    def __getstate__(self) -> dict:  # safe_open handles do not pickle: reopened lazily in the worker
        return {"folder": self.folder, "meta": self.meta, "_open": {}}


def shard_list(cfg: DataConfig, split: str) -> list[str]:
    pattern = cfg.train_shards if split == "train" else cfg.val_shards
    pattern = pattern or os.path.join(cfg.root, "wds", split, "*.tar")
    shards = expand_braces(pattern)
    if not shards:
        key = "data.train_shards" if split == "train" else "data.val_shards"
        raise FileNotFoundError(f"{key}: no .tar shards match {pattern!r}")
    return shards


def tokenizer_dir(cfg: DataConfig) -> str:
    d = cfg.tokenizer or os.path.join(cfg.root, "tokenizer")
    if not Path(d).is_dir():
        raise FileNotFoundError(f"data.tokenizer: directory does not exist: {d}")
    return d
