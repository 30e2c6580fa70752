"""Encode the training images with the frozen VAE once: ``python -m encoder.cache_latents --config
configs/encoder/toy.yaml cache.out_dir=runs/toy/latents`` (``make cache-latents``). Training with
``data.latent_cache=<dir>`` then skips the VAE encoder (it still reads the images for the pixel losses).

Layout: ``meta.json`` + ``latents_<res>_<k>.safetensors`` chunks of ``chunk_size`` rows (``latents``, ``valid``),
row = dataset index, for every stage resolution. Bad samples are marked invalid and counted, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from encoder.data import ImageTextDataset, Tokenize, shard_list, tokenizer_dir
from encoder.train import Config, build_index, build_vae
from ov3common.checkpoint import atomic_write_json, save_safetensors
from ov3common.config import parse_cli
from ov3common.images import SkipStats
from ov3common.log import get_logger, progress


@dataclass
class CacheSection:
    out_dir: str = ""  # empty: <out_dir>/latents (beside the config's run)
    split: str = "train"
    resolutions: list[int] = field(default_factory=list)  # empty: every train stage resolution
    batch_size: int = 64
    chunk_size: int = 10000
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class CacheConfig(Config):
    cache: CacheSection = field(default_factory=CacheSection)


def _raw(items: list[dict]) -> list[dict]:
    return items


class ChunkWriter:
    """Appends rows and writes ``latents_<res>_<k>.safetensors`` every ``chunk_size`` rows."""

    def __init__(self, out: Path, res: int, chunk_size: int, dtype: torch.dtype):
        self.out, self.res, self.chunk_size, self.dtype = out, res, chunk_size, dtype
        self.lat: list[torch.Tensor] = []
        self.valid: list[bool] = []
        self.k = self.rows = 0

    def add(self, z: torch.Tensor, valid: bool) -> None:
        self.lat.append(z[None])
        self.valid.append(valid)
        self.rows += 1
        if len(self.valid) == self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if self.valid:
            save_safetensors(self.out / f"latents_{self.res}_{self.k:05d}.safetensors",
                             {"latents": torch.cat(self.lat).to(self.dtype), "valid": torch.tensor(self.valid)})
            self.k += 1
        self.lat, self.valid = [], []


def cache_latents(cfg: CacheConfig) -> dict:
    log = get_logger("encoder.cache_latents")
    out = Path(cfg.cache.out_dir or Path(cfg.out_dir) / "latents")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = build_vae(cfg.vae, device)
    tokenize = Tokenize(tokenizer_dir(cfg.data), cfg.data.max_text_len)
    index = build_index(shard_list(cfg.data, cfg.cache.split), out / f"index_{cfg.cache.split}.json", True)
    resolutions = list(cfg.cache.resolutions) or sorted({s.resolution for s in cfg.train.stages})
    stats = SkipStats()
    for res in resolutions:
        ds = ImageTextDataset(index, tokenize, res, cfg.data, seed=cfg.seed)
        loader = DataLoader(ds, batch_size=cfg.cache.batch_size, collate_fn=_raw, num_workers=cfg.data.num_workers)
        writer = ChunkWriter(out, res, cfg.cache.chunk_size, getattr(torch, cfg.cache.dtype))
        blank = torch.zeros(vae.latent_channels, res // vae.downsample, res // vae.downsample)
        for items in progress(loader, desc=f"latents {res}px"):
            good = [x for x in items if "bad" not in x]
            lat = iter(vae.encode(torch.stack([x["image"] for x in good]).to(device)).cpu()) if good else iter(())
            for x in items:
                if "bad" in x:
                    if res == resolutions[0]:
                        stats.add(x["bad"])
                    writer.add(blank, False)
                else:
                    writer.add(next(lat), True)
        writer.flush()
        log.info("%d px: %d rows in %d chunks", res, writer.rows, writer.k)
    meta = {"shards": index.shards, "resolutions": resolutions, "chunk_size": cfg.cache.chunk_size,
            "n": len(index), "dtype": cfg.cache.dtype, "vae": {"path": cfg.vae.path, **vae.reference()},
            "skipped": stats.as_dict()}
    atomic_write_json(out / "meta.json", meta)
    stats.log(log, "cache")
    return meta


def main(argv: list[str] | None = None) -> None:
    cache_latents(parse_cli(CacheConfig, argv, default_config="configs/encoder/toy.yaml"))


if __name__ == "__main__":
    main()
