"""The encoder's latent cache: VAE latents of every training image, computed once by ``encoder.cache_latents`` and
read by ``encoder.train`` (``data.latent_cache``) instead of running the frozen VAE encoder on every step.

A cache records the identity of the VAE that wrote it (``vae_identity``) and is refused by a run whose VAE, crop or
resolutions differ, with the key and both values in the message.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from ov3common.checkpoint import read_format_json
from ov3common.config import ConfigError

CACHE_FORMAT = "ov3-encoder-latents/2"


def vae_identity(path: str, vae) -> dict:
    """What a latent cache must match: the VAE's source, a hash of its config, a fingerprint of its weights
    (first and last parameter tensors), and the latent convention (scaling, shift)."""
    conf = {k: v for k, v in dict(vae.vae.config).items() if not str(k).startswith("_")}
    params = list(vae.vae.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {"path": str(Path(path).resolve()) if path else "random_tiny",
            "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest(),
            "weights_fingerprint": h.hexdigest()[:32], **vae.reference()}


class LatentCache:
    """Read-only VAE latents written by ``encoder.cache_latents``, one file per data shard:
    ``<dir>/meta.json`` and ``<dir>/<shard name>.safetensors`` (``latents_<res> [n,C,h,w]``, ``valid [n]``,
    the sample keys in its metadata). Opened lazily per shard (a few open at a time), so it scales with the
    data. Refuses a cache built with another VAE, crop or resolution."""

    def __init__(self, folder: str, vae_id: dict, resolutions: list[int], crop: str, max_open: int = 16):
        self.folder = Path(folder)
        self.meta = read_format_json(self.folder / "meta.json", CACHE_FORMAT, "data.latent_cache",
                                     "build it with `make cache-latents`")
        theirs = self.meta.get("vae", {})
        for k in ("config_sha256", "weights_fingerprint", "scaling_factor", "shift_factor"):
            if theirs.get(k) != vae_id.get(k):
                raise ValueError(f"data.latent_cache {folder}: built with another VAE ({k} {theirs.get(k)!r} from "
                                 f"{theirs.get('path')!r}; this run's vae {vae_id.get('path')!r} has "
                                 f"{vae_id.get(k)!r}); rebuild it with `make cache-latents`")
        if crop != "center":
            raise ConfigError(f"data.latent_cache: holds centre-crop latents; data.crop is {crop!r} "
                              f"(set data.crop=center, or train without the cache)")
        missing = [r for r in resolutions if r not in self.meta["resolutions"]]
        if missing:
            raise ValueError(f"data.latent_cache {folder} has no {missing} px latents (has {self.meta['resolutions']})")
        self.max_open = max_open
        self._open: OrderedDict = OrderedDict()

    def _shard(self, name: str):
        h = self._open.get(name)
        if h is None:
            path = self.folder / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"data.latent_cache: no latents for shard {name} ({path}); "
                                        f"run `make cache-latents` over the same shards")
            f = safe_open(str(path), "pt")
            keys = json.loads(f.metadata()["keys"])
            h = (f, {k: i for i, k in enumerate(keys)}, f.get_tensor("valid"))
            self._open[name] = h
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(name)
        return h

    def get(self, name: str, key: str, res: int) -> Tensor | None:
        f, rows, valid = self._shard(name)
        j = rows.get(key)
        if j is None:
            raise KeyError(f"data.latent_cache: shard {name} has no sample {key!r} (the shard changed since the "
                           f"cache was built?)")
        if not bool(valid[j]):
            return None
        return f.get_slice(f"latents_{res}")[j : j + 1][0].float()

    def __getstate__(self) -> dict:  # safe_open handles do not pickle: reopened lazily in the worker
        return {**self.__dict__, "_open": OrderedDict()}
