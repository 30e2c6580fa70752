"""Encode the training images with the frozen VAE once: ``python -m encoder.cache_latents --config
configs/encoder/toy.yaml`` (``make cache-latents``; ``cache.out_dir`` defaults to ``<out_dir>/latents``). Training with
``data.latent_cache=<dir>`` then skips the VAE encoder (it still reads the images for the pixel losses).

Layout, sharded like the data (see ``encoder.latent_cache.LatentCache``): one ``<shard name>.safetensors`` per data
shard (``latents_<res>`` for every stage resolution, ``valid``; the sample keys in its metadata) and
``meta.json`` (the VAE's identity, the resolutions, the crop, the shards). Centre crops only (a cache fixes the
crop). Bad samples are marked invalid and counted, never fatal. Each shard file is written atomically and kept
on a rerun with the same VAE and resolutions, so an interrupted cache resumes; under torchrun every rank
encodes every world-th shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from encoder.data import ImageTextDecoder, Tokenize, shard_list, tokenizer_dir
from encoder.latent_cache import CACHE_FORMAT, vae_identity
from encoder.train import Config
from encoder.vae import build_vae
from ov3common.checkpoint import atomic_write_json, save_safetensors
from ov3common.config import parse_cli
from ov3common.dist import barrier, cleanup, init_distributed
from ov3common.images import SkipStats
from ov3common.log import get_logger, progress
from ov3common.shards import iter_tar, shard_name


@dataclass
class CacheSection:
    out_dir: str = ""  # empty: <out_dir>/latents (beside the config's run)
    split: str = "train"
    resolutions: list[int] = field(default_factory=list)  # empty: every train stage resolution
    batch_size: int = 64
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class CacheConfig(Config):
    cache: CacheSection = field(default_factory=CacheSection)


def _done(path: Path, resolutions: list[int], ident: dict) -> dict | None:
    """The stored counts of a finished shard file written with the same VAE and resolutions, else None."""

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    info = json.loads(meta.get("info", "{}"))
    if info.get("vae") != ident or info.get("resolutions") != resolutions:
        return None
    return info


def cache_shard(url: str, out: Path, decoders: dict, vae, device, batch_size: int, dtype, ident: dict) -> dict:
    """Encode one data shard into ``<out>/<name>.safetensors``; returns its counts."""
    keys, valid, stats = [], [], SkipStats()
    lat: dict[int, list[torch.Tensor]] = {r: [] for r in decoders}
    samples = list(iter_tar(url, on_error=lambda reason, u, d: stats.add(reason)))
    for i in range(0, len(samples), batch_size):
        part = samples[i : i + batch_size]
        for res, dec in decoders.items():
            items = [dec(s) for s in part]
            good = [x for x in items if "bad" not in x]
            z = iter(vae.encode(torch.stack([x["image"] for x in good]).to(device)).cpu()) if good else iter(())
            blank = torch.zeros(vae.latent_channels, res // vae.downsample, res // vae.downsample)
            for x in items:
                lat[res].append((next(z) if "bad" not in x else blank).to(dtype)[None])
            if res == next(iter(decoders)):
                keys += [s.key for s in part]
                valid += ["bad" not in x for x in items]
                for x in items:
                    if "bad" in x:
                        stats.add(x["bad"])
    name = shard_name(url)
    info = {"vae": ident, "resolutions": list(decoders), "n": len(keys), "skipped": stats.as_dict()["skipped"]}
    tensors = {f"latents_{r}": (torch.cat(v) if v else torch.zeros(0)) for r, v in lat.items()}
    tensors["valid"] = torch.tensor(valid, dtype=torch.bool)
    save_safetensors(out / f"{name}.safetensors", tensors, metadata={"keys": json.dumps(keys), "info": json.dumps(info)})
    return info


def cache_latents(cfg: CacheConfig) -> dict:
    info = init_distributed(cfg.train.device)
    log = get_logger("encoder.cache_latents")
    out = Path(cfg.cache.out_dir or Path(cfg.out_dir) / "latents")
    out.mkdir(parents=True, exist_ok=True)
    vae = build_vae(cfg.vae, info.device)
    ident = vae_identity(cfg.vae.path, vae)
    tokenize = Tokenize(tokenizer_dir(cfg.data), cfg.data.max_text_len)
    urls = shard_list(cfg.data, cfg.cache.split)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"data.{cfg.cache.split}_shards: shard names repeat ({dup}); the cache has one file per name")
    resolutions = list(cfg.cache.resolutions) or sorted({s.resolution for s in cfg.train.stages})
    decoders = {r: ImageTextDecoder(tokenize, r, cfg.data, seed=cfg.seed, crop="center") for r in resolutions}
    dtype = getattr(torch, cfg.cache.dtype)
    mine = list(range(info.rank, len(urls), info.world_size))
    per_shard: dict[str, dict] = {}
    for i in progress(mine, desc="latent cache (shards)"):
        path = out / f"{names[i]}.safetensors"
        done = _done(path, resolutions, ident)
        per_shard[names[i]] = done if done is not None else cache_shard(
            urls[i], out, decoders, vae, info.device, cfg.cache.batch_size, dtype, ident)
    if info.world_size > 1:
        parts: list = [None] * info.world_size
        torch.distributed.all_gather_object(parts, per_shard)
        per_shard = {k: v for p in parts for k, v in p.items()}
    stats = SkipStats()
    for v in per_shard.values():
        stats.skipped.update(v.get("skipped", {}))
    meta = {"format": CACHE_FORMAT, "vae": ident, "resolutions": resolutions, "crop": "center",
            "dtype": cfg.cache.dtype, "shards": {n: per_shard[n]["n"] for n in names},
            "n": sum(per_shard[n]["n"] for n in names), "skipped": stats.as_dict()["skipped"]}
    if info.is_main:
        atomic_write_json(out / "meta.json", meta)
        stats.log(log, "cache")
        log.info("latent cache %s: %d samples in %d shard files at %s px", out, meta["n"], len(names), resolutions)
    barrier()
    return meta


def main(argv: list[str] | None = None) -> None:
    try:
        cache_latents(parse_cli(CacheConfig, argv, default_config="configs/encoder/toy.yaml"))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
