"""``make cache-rae-latents``: encode class-labelled images with the frozen encoder into safetensors shards.

Bad images never stop the run: they are skipped and counted per reason (logged and stored in ``meta.json``);
odd but decodable modes are converted to RGB and kept. ``meta.json`` is written last, so a cache without it is
incomplete and is rebuilt. Under torchrun each rank encodes every ``world``-th sample into its own shards and the
statistics are summed across ranks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from encoder.export import load_encoder
from ov3common import dist as D
from ov3common.checkpoint import atomic_write_json, save_safetensors
from ov3common.config import parse_cli, save_config
from ov3common.images import SkipStats
from ov3common.log import get_logger, progress
from rae_generation.config import CacheConfig
from rae_generation.data import CACHE_FORMAT, collate_images, open_source, token_sums

log = get_logger("rae.cache")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint(encoder: str, source: str, image_size: int, flip: bool = False) -> str:
    """Identifies what a cache was built from: the export's files (size + mtime), the source path, the size, and the
    source's top two levels (the folder and its entries: class folders or shard files, name + size + mtime), so a
    regenerated or edited source (a class folder rewritten, a shard replaced) rebuilds the cache; one stat per
    entry (ImageNet: ~1,000)."""
    src = Path(source)
    parts = [str(src.resolve()), str(image_size)] + (["flip"] if flip else [])
    for e in [src] + (sorted(src.iterdir()) if src.is_dir() else []):
        st = e.stat()
        parts.append(f"{e.name}:{st.st_size if e.is_file() else 0}:{st.st_mtime_ns}")
    for name in ("config.json", "model.safetensors"):
        st = (Path(encoder) / name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_is_complete(out: Path, cfg) -> bool:
    meta = out / "meta.json"
    if not meta.is_file():
        return False
    return json.loads(meta.read_text()).get("fingerprint") == fingerprint(cfg.encoder, cfg.source, cfg.image_size,
                                                                          cfg.flip)


def build_cache(cfg, info: D.DistInfo | None = None) -> Path:
    """Encode ``cfg.source`` into ``cfg.out_dir``; returns the cache folder."""

    info = info or D.init_distributed(cfg.device)
    out = Path(cfg.out_dir)
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    if not cfg.overwrite and cache_is_complete(out, cfg):
        log.info("latent cache %s is complete for this encoder and source; nothing to do (overwrite=true rebuilds it)",
                 out)
        return out
    if info.is_main:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        save_config(cfg, out / "cache_config.yaml")
    D.barrier()
    enc = load_encoder(cfg.encoder, device=info.device)
    if enc.image_size != cfg.image_size:
        log.warning("encoder was exported at %d px, caching at %d px", enc.image_size, cfg.image_size)
    source = open_source(cfg.source, cfg.image_size)
    n_total = min(len(source), cfg.limit) if cfg.limit > 0 else len(source)
    mine = list(range(info.rank, n_total, info.world_size))
    loader = DataLoader(Subset(source, mine), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=collate_images, shuffle=False)
    stats = SkipStats()
    stats.update(getattr(source, "scan_stats", SkipStats()) if info.is_main else SkipStats())
    sums: dict[str, torch.Tensor] | None = None
    buf: dict[str, list] = {"tokens": [], "labels": [], "index": [], **({"tokens_flip": []} if cfg.flip else {})}
    shards: list[dict] = []
    t0 = time.time()

    def flush(final: bool = False) -> None:
        """Write full shards of exactly ``shard_size`` samples (and the remainder when ``final``)."""
        if not buf["labels"]:
            return
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        n, start = len(tensors["labels"]), 0
        while n - start >= cfg.shard_size or (final and start < n):
            stop = min(start + cfg.shard_size, n)
            name = f"shard-r{info.rank:03d}-{len(shards):05d}.safetensors"
            save_safetensors(out / name, {k: v[start:stop].contiguous() for k, v in tensors.items()},
                             metadata={"format": CACHE_FORMAT})
            shards.append({"file": name, "n": stop - start})
            start = stop
        for k, v in tensors.items():
            buf[k] = [v[start:]] if start < n else []

    for batch in progress(loader, desc="cache latents"):
        stats.update(batch["stats"])
        if batch["labels"].numel() == 0:
            continue
        images = batch["images"].to(info.device)
        tokens = enc.encode(images)[0].float().cpu()
        views = [tokens]
        if cfg.flip:  # the mirrored image's tokens (not a flip of the tokens: the ViT is not mirror-symmetric)
            views.append(enc.encode(images.flip(-1))[0].float().cpu())
            buf["tokens_flip"].append(views[1].to(_DTYPES[cfg.dtype]))
        for v in views:  # the statistics cover every view training reads
            s = token_sums(v)
            sums = s if sums is None else {k: sums[k] + s[k] for k in s}
        buf["tokens"].append(tokens.to(_DTYPES[cfg.dtype]))
        buf["labels"].append(batch["labels"])
        buf["index"].append(batch["index"])
        if sum(len(x) for x in buf["labels"]) >= cfg.shard_size:
            flush()
    flush(final=True)
    if sums is None:
        sums = {"sum": torch.zeros(enc.num_tokens, enc.width, dtype=torch.float64),
                "sumsq": torch.zeros(enc.num_tokens, enc.width, dtype=torch.float64),
                "count": torch.tensor(0.0, dtype=torch.float64)}
    if info.distributed:
        for v in sums.values():
            dist.all_reduce(v)
        parts: list = [None] * info.world_size
        dist.all_gather_object(parts, shards)
        shards = [s for p in parts for s in p]
    stats = stats.reduce()
    if info.is_main:
        if float(sums["count"]) < 2:
            log.warning("%s: only %d usable labelled images (skipped: %s); the cache cannot be trained on",
                        cfg.source, int(sums["count"]), stats.as_dict()["skipped"])
        save_safetensors(out / "stats.safetensors", sums)
        meta = {"format": CACHE_FORMAT, "version": 1, "encoder": str(Path(cfg.encoder).resolve()),
                "fingerprint": fingerprint(cfg.encoder, cfg.source, cfg.image_size, cfg.flip), "flip": cfg.flip,
                "source": str(Path(cfg.source).resolve()), "image_size": cfg.image_size,
                "num_tokens": enc.num_tokens, "grid_size": enc.grid_size, "width": enc.width,
                "classes": list(source.classes), "num_samples": int(sums["count"]), "dtype": cfg.dtype,
                "shards": shards, **stats.as_dict(), "seconds": round(time.time() - t0, 1)}
        atomic_write_json(out / "meta.json", meta)
        stats.log(log, "cache")
        log.info("cached %d samples (%d classes, %d tokens x %d) in %s", meta["num_samples"], len(meta["classes"]),
                 enc.num_tokens, enc.width, out)
    D.barrier()
    return out


def main(argv=None) -> None:
    cfg = parse_cli(CacheConfig, argv, default_config="configs/rae/cache_toy.yaml")
    info = D.init_distributed(cfg.device)
    try:
        build_cache(cfg, info)
    finally:
        D.cleanup()


if __name__ == "__main__":
    main()
