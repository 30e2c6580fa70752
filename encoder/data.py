"""Image-text data for the encoder: webdataset tar shards (DataComp / Recap-DataComp layout), streamed.

Shards are read through ``ov3common.shards`` and ordered by ``ov3common.data.ShardStreams`` (seeded shard
dealing to logical streams, a shuffle buffer per stream, exact resume from a per-stream state; no global index).
A sample ``KEY`` is the group of members ``KEY.<ext>``; fields are named by spec, alternatives separated by ``;``,
the first present wins: ``"jpg;png"`` (members), ``"txt"``, ``"json:re_caption"`` (a field of ``KEY.json``).

Field presets (``data.preset``; ``data.alt_field`` / ``data.recap_field`` override them):

* ``recap_datacomp`` — Recap-DataComp-1B downloaded with img2dataset from its parquet (columns ``url``,
  ``re_caption``, ``org_caption``) with the alt-text as caption and the recaption kept:
  ``--caption_col org_caption --save_additional_columns '["re_caption"]'``: ``KEY.txt`` alt-text,
  ``KEY.json`` ``{"re_caption": ...}``.
* ``recap_datacomp_txt`` — the other common download, ``--caption_col re_caption --save_additional_columns
  '["org_caption"]'``: ``KEY.txt`` recaption, ``KEY.json`` ``{"org_caption": alt-text}``.
* ``datacomp`` — plain DataComp (``KEY.jpg``, ``KEY.txt`` alt-text, ``KEY.json`` metadata): no recaptions, the
  recaption branch trains on the alt-text by design (not counted as a fallback).
* ``toy`` — the embedded toy world (``KEY.txt`` alt-text, ``KEY.json`` ``{"recaption": ...}``).

Bad input never raises: a bad sample comes back as ``{"bad": reason}`` and the collate function drops and counts
it (``ov3common.images`` reasons); decodable odd image modes are converted and counted. An unparsable
``KEY.json`` drops only the metadata (``converted/meta_dropped``): the sample falls back to its alt-text
(``converted/recap_from_alt``) and is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF
from transformers import AutoTokenizer

from encoder.latent_cache import LatentCache
from ov3common.config import ConfigError, choice_field, path_field
from ov3common.data import ShardStreams, StreamLoader, StreamSpec
from ov3common.images import (
    BadSample,
    SkipStats,
    center_crop_resize,
    decode_image,
    decode_json,
    decode_text,
    to_tensor_pm1,
)
from ov3common.shards import TarSample, expand_urls, iter_tar, shard_name

# preset -> (alt-text spec, recaption spec); "" = no recaptions (the recaption branch uses the alt-text)
PRESETS: dict[str, tuple[str, str]] = {
    "recap_datacomp": ("txt;json:org_caption", "json:re_caption"),
    "recap_datacomp_txt": ("json:org_caption", "txt"),
    "datacomp": ("txt", ""),
    "toy": ("txt", "json:recaption"),
    "custom": ("", ""),
}


@dataclass
class DataConfig:
    """Where the image-text pairs come from and how they are read."""

    preset: str = choice_field("recap_datacomp", tuple(PRESETS))  # field layout (see the module doc)
    root: str = path_field("", "dir")  # the toy world's root (shards <root>/wds/<split>/, tokenizer <root>/tokenizer)
    train_shards: str = ""  # brace/glob pattern(s) of .tar shards, `::`-separated; pipe:CMD URLs too
    val_shards: str = ""  # required with train_shards
    tokenizer: str = path_field("", "dir")  # HF tokenizer folder; empty: <root>/tokenizer
    image_field: str = "jpg;jpeg;png;webp"
    alt_field: str = ""  # web alt-text; empty: the preset's
    recap_field: str = ""  # long recaption; empty: the preset's; "none": no recaptions
    recap_fallback: bool = True  # a sample without a recaption uses its alt-text (counted as recap_from_alt)
    recap_check_steps: int = 20  # log the recap_from_alt rate over the first N steps ...
    recap_warn: float = 0.05  # ... and warn above this fraction
    max_text_len: int = 64
    num_workers: int = 0
    worker_start: str = choice_field("forkserver", ("forkserver", "spawn", "fork"))  # DataLoader workers' start
    worker_timeout: float = 900.0  # seconds a worker may take for one chunk before the run fails (0: no limit)
    streams: int = 0  # logical sample streams; 0: world size x max(num_workers, 1). The order depends on it only
    shuffle_buffer: int = 1000  # samples per stream (OpenVision: 250k over the whole input pipeline)
    shuffle_shards: bool = True
    resampled: bool = False  # draw shards with replacement (open_clip --dataset-resampled): epochs never end
    crop: str = choice_field("random_resized", ("random_resized", "center"))  # training images; val: center
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # area fraction (OpenVision: area_min=40)
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio range
    latent_cache: str = path_field("", "dir")  # folder from `make cache-latents`; empty = on the fly
    val_size: int = 256


def fields(cfg: DataConfig) -> tuple[str, str]:
    """(alt spec, recap spec) of the config: the explicit fields, else the preset's ("" = no recaptions)."""
    alt, recap = PRESETS[cfg.preset]
    alt = cfg.alt_field or alt
    recap = "" if cfg.recap_field == "none" else (cfg.recap_field or recap)
    if not alt:
        raise ConfigError("data.alt_field: empty (preset 'custom' needs data.alt_field and data.recap_field)")
    return alt, recap


def get_field(members: dict[str, bytes], spec: str, cache: dict) -> bytes | str | None:
    """The first present alternative of ``spec``; ``json:a.b`` reads a field of KEY.json (parsed once; an
    unparsable KEY.json counts as absent and sets ``cache["bad_json"]``)."""
    for alt in spec.split(";"):
        if alt.startswith("json:"):
            if "json" not in cache:
                try:
                    cache["json"] = decode_json(members.get("json")) if "json" in members else {}
                except BadSample:
                    cache["json"], cache["bad_json"] = {}, True
            value = cache["json"]
            for part in alt[5:].split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                return value if isinstance(value, str) else json.dumps(value)
        elif alt in members:
            return members[alt]
    return None


def key_id(key: str) -> int:
    """A stable 48-bit integer id of a sample key (the model's per-sample noise stream is keyed by it)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "little")


def sentences(text: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return parts or [text]


class Tokenize:
    """HF tokenizer → ``[<s>] + ids + [</s>]`` truncated to ``max_len`` (pickles into workers)."""

    def __init__(self, tokenizer_dir: str, max_len: int):
        # one thread per data worker: the Rust tokenizer's own thread pool only adds contention there
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        return self.many([text])[0]

    def many(self, texts: list[str]) -> list[Tensor]:
        """Several texts in one tokenizer call (the per-call overhead dominates short captions)."""
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [torch.tensor([self.bos, *x[: self.max_len - 2], self.eos], dtype=torch.long) for x in ids]

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad, self.bos, self.eos)], skip_special_tokens=True)


def random_resized_crop(img, size: int, scale, ratio, seed: str):
    """torchvision's RandomResizedCrop (its own parameter sampler, seeded per sample) with bilinear,
    antialiased resizing (OpenVision's ``inception_crop(..., method="bilinear", antialias=True)``)."""

    gen = torch.random.default_generator  # CPU only: torch.manual_seed would also queue lazy CUDA/XPU seeding
    state = gen.get_state()
    try:
        gen.manual_seed(int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "little") >> 1)
        i, j, h, w = RandomResizedCrop.get_params(img, list(scale), list(ratio))
    finally:
        gen.set_state(state)
    return TF.resized_crop(img, i, j, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)


class ImageTextDecoder:
    """A raw shard sample → ``dict(image [, latent], alt, recap, sent, alt_text, key, converted)`` or
    ``{"bad": reason}``. Pickles into DataLoader workers; every random choice is seeded by
    (seed, epoch, shard, sample) so it does not depend on the process layout."""

    def __init__(self, tokenize: Tokenize, resolution: int, cfg: DataConfig, seed: int = 0, crop: str | None = None,
                 latents: LatentCache | None = None, resampled: bool = False):
        self.tokenize, self.resolution, self.seed, self.latents = tokenize, resolution, seed, latents
        self.alt_spec, self.recap_spec = fields(cfg)
        self.image_spec, self.fallback = cfg.image_field, cfg.recap_fallback
        self.crop = crop or cfg.crop
        self.scale, self.ratio = tuple(cfg.crop_scale), tuple(cfg.crop_ratio)
        self.resampled = resampled

    def __call__(self, s: TarSample, epoch: int = 0, cursor: int = 0) -> dict:
        name = shard_name(s.url)
        sid = f"{self.seed}/{epoch}/{name}/{s.index}" + (f"/{cursor}" if self.resampled else "")
        key = f"{name}/{s.key}"
        try:
            cache: dict = {}
            out: dict = {"key": key, "converted": []}
            alt_raw = get_field(s.members, self.alt_spec, cache)
            recap_raw = get_field(s.members, self.recap_spec, cache) if self.recap_spec else None
            if cache.get("bad_json"):
                out["converted"].append("meta_dropped")
            alt = decode_text(alt_raw, "caption")
            if not self.recap_spec:
                recap = alt  # no recaptions in this layout (preset datacomp): by design, not a fallback
            elif recap_raw is None and self.fallback:
                recap = alt
                out["converted"].append("recap_from_alt")
            else:
                recap = decode_text(recap_raw, "caption")
            if self.latents is not None:
                lat = self.latents.get(name, s.key, self.resolution)
                if lat is None:
                    raise BadSample("not_an_image", "marked bad in the latent cache")
                out["latent"] = lat
            conv = SkipStats()
            img = decode_image(get_field(s.members, self.image_spec, cache), stats=conv)
            out["converted"] += list(conv.converted)
        except BadSample as e:
            return {"bad": e.reason, "key": key}
        if self.crop == "random_resized":
            img = random_resized_crop(img, self.resolution, self.scale, self.ratio, sid + "/crop")
        else:
            img = center_crop_resize(img, self.resolution)
        out["image"] = to_tensor_pm1(img)
        # one random sentence of the recaption for the second contrastive pair (CLIPS)
        rng = random.Random(sid)
        out["alt"], out["recap"], out["sent"] = self.tokenize.many([alt, recap, rng.choice(sentences(recap))])
        out["alt_text"] = alt
        return out


def pad_ids(seqs: list[Tensor], pad: int) -> Tensor:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), pad, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, : len(s)] = s
    return out


def _count(items, key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        for c in ([x[key]] if isinstance(x[key], str) else x[key]):
            out[c] = out.get(c, 0) + 1
    return out


class Collate:
    """Drop bad samples (counted per reason in ``batch['skipped']``) and pad the text; :meth:`merge` joins the
    chunks of several DataLoader workers into one step batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        good = [x for x in items if "bad" not in x]
        batch: dict = {"skipped": _count([x for x in items if "bad" in x], "bad"), "converted": _count(good, "converted"),
                       "n_drawn": len(items), "n": len(good), "key": [x["key"] for x in good]}
        if not good:
            return batch
        batch["index"] = torch.tensor([key_id(x["key"]) for x in good])
        batch["image"] = torch.stack([x["image"] for x in good])
        if "latent" in good[0]:
            batch["latent"] = torch.stack([x["latent"] for x in good])
        for k in ("alt", "recap", "sent"):
            batch[k] = pad_ids([x[k] for x in good], self.pad_id)
        batch["alt_text"] = [x["alt_text"] for x in good]
        return batch

    def merge(self, chunks: list[dict]) -> dict:
        if len(chunks) == 1:
            return chunks[0]
        out: dict = {"skipped": {}, "converted": {}, "n_drawn": 0, "n": 0, "key": [], "alt_text": []}
        for c in chunks:
            for k in ("skipped", "converted"):
                for r, v in c[k].items():
                    out[k][r] = out[k].get(r, 0) + v
            out["n_drawn"] += c["n_drawn"]
            out["n"] += c["n"]
            out["key"] += c["key"]
            out["alt_text"] += c.get("alt_text", [])
        good = [c for c in chunks if c["n"]]
        if not good:
            out.pop("alt_text")
            return out
        for k in ("index", "image", "latent"):
            if k in good[0]:
                out[k] = torch.cat([c[k] for c in good])
        for k in ("alt", "recap", "sent"):
            n = max(c[k].shape[1] for c in good)
            out[k] = torch.cat([torch.nn.functional.pad(c[k], (0, n - c[k].shape[1]), value=self.pad_id)
                                for c in good])
        return out


def recap_report(first: dict, steps: int, cfg: DataConfig, log, device="cpu") -> dict:
    """The alt-text fallback rate (``recap_from_alt``) over the first ``steps`` steps, summed over ranks: logged,
    with a warning above ``data.recap_warn`` (a recaption field that does not match the shards' layout)."""
    t = torch.tensor([float(first["kept"]), float(first["recap_from_alt"])], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    kept, n_alt = (int(v) for v in t.tolist())
    rate = n_alt / max(kept, 1)
    alt, recap = fields(cfg)
    warn = bool(recap) and rate > cfg.recap_warn
    if not recap:
        log.info("data: preset %s has no recaptions; the recaption branch trains on the alt-text", cfg.preset)
    elif warn:
        log.warning("data: %.1f%% of the samples of the first %d steps (%d of %d) have no recaption under "
                    "field %r and train on their alt-text (recap_from_alt); check data.preset / data.recap_field "
                    "against the shards' KEY.json", 100 * rate, steps, n_alt, kept, recap)
    else:
        log.info("data: recap_from_alt %.1f%% over the first %d steps (%d of %d samples)", 100 * rate, steps,
                 n_alt, kept)
    return {"data/recap_from_alt_rate": rate, "data/recap_from_alt": n_alt, "data/kept_first_steps": kept,
            "data/recap_from_alt_warning": int(warn)}


# ------------------------------------------------------------------------------------------------ shards
def shard_list(cfg: DataConfig, split: str) -> list[str]:
    """The split's shard URLs: ``data.train_shards`` / ``data.val_shards``, or the toy world's under
    ``data.root`` when no shards are given. Validation shards are required with training shards unless the config
    names the toy world (``data.root``)."""
    key = "data.train_shards" if split == "train" else "data.val_shards"
    pattern = cfg.train_shards if split == "train" else cfg.val_shards
    if not pattern and split != "train" and cfg.train_shards and not cfg.root:
        raise ConfigError("data.val_shards: required when data.train_shards is given (validation falls back to "
                          "the toy world only when data.root names it)")
    if not pattern:
        if not cfg.root:
            raise ConfigError(f"{key}: empty, and no data.root (the toy world) to take it from; set {key}")
        pattern = os.path.join(cfg.root, "wds", split, "*.tar")
    urls = expand_urls(pattern)
    if not urls:
        raise ConfigError(f"{key}: no .tar shards match {pattern!r}")
    return urls


def tokenizer_dir(cfg: DataConfig) -> str:
    if not cfg.tokenizer and not cfg.root:
        raise ConfigError("data.tokenizer: empty (set a local HF tokenizer folder)")
    d = cfg.tokenizer or os.path.join(cfg.root, "tokenizer")
    if not Path(d).is_dir():
        raise FileNotFoundError(f"data.tokenizer: directory does not exist: {d}")
    return d


def num_streams(cfg: DataConfig, world: int) -> int:
    s = cfg.streams or world * max(cfg.num_workers, 1)
    if s % (world * max(cfg.num_workers, 1)):
        raise ConfigError(f"data.streams: {s} is not a multiple of world size x data.num_workers "
                          f"({world} x {max(cfg.num_workers, 1)})")
    return s


def train_loader(cfg: DataConfig, urls: list[str], decoder: ImageTextDecoder, collate: Collate, seed: int,
                 rank: int, world: int, global_batch: int, epoch: int, state: dict | None,
                 pin_memory: bool = False) -> StreamLoader:
    """This rank's step batches (``global_batch / world`` samples drawn each) from its streams."""
    spec = StreamSpec(tuple(urls), num_streams(cfg, world), seed, cfg.shuffle_shards, cfg.shuffle_buffer,
                      cfg.resampled)
    if global_batch % spec.streams:
        raise ConfigError(f"train.stages: batch_size {global_batch} is not a multiple of data.streams "
                          f"({spec.streams}): every stream gives the same number of samples to a step")
    ds = ShardStreams(spec, rank, world, global_batch // spec.streams, decoder, collate, epoch, state)
    return StreamLoader(ds, cfg.num_workers, collate.merge, pin_memory, cfg.worker_start, cfg.worker_timeout)


def stream_state(streams: dict, dc: DataConfig, world: int, epoch: int) -> dict:
    """The data position of this rank for its checkpoint (buffer references as tensors)."""
    out = {str(s): {**st, "buffer": torch.as_tensor(st["buffer"])} for s, st in streams.items()}
    return {"layout": {"world": world, "workers": dc.num_workers, "streams": dc.streams}, "epoch": epoch,
            "streams": out}


def load_stream_state(d: dict, dc: DataConfig, world: int, epoch: int) -> dict:
    if not d:
        return {}
    lay = d["layout"]
    if (lay["world"], lay["workers"], lay["streams"]) != (world, dc.num_workers, dc.streams):
        raise ValueError(f"resume: the checkpoint's data streams were laid out for world size {lay['world']}, "
                         f"data.num_workers {lay['workers']}, data.streams {lay['streams']}; this run has "
                         f"{world}, {dc.num_workers}, {dc.streams} (resume with the same layout)")
    if int(d["epoch"]) != epoch:
        return {}
    return {int(s): {**st, "buffer": st["buffer"].numpy()} for s, st in d["streams"].items()}


def val_items(cfg: DataConfig, decoder: ImageTextDecoder) -> list[dict]:
    """The first ``val_size`` samples of the validation shards, in shard order (centre crop)."""
    items: list[dict] = []
    for url in shard_list(cfg, "val"):
        for s in iter_tar(url, stop=cfg.val_size - len(items)):
            items.append(decoder(s))
        if len(items) >= cfg.val_size:
            break
    return items
