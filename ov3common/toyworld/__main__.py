"""Build the toy world: ``python -m ov3common.toyworld --out data/toy [--resolution 64] [--n-train 20000] ...``

Settings come from the ToyConfig defaults, then ``--config configs/data/<name>.yaml``, then the flags, then
dotted ``key=value`` overrides (so ``make data ARGS="n_train=5000"`` and ``ARGS="--n-train 5000"`` both work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from omegaconf import OmegaConf

from ov3common.config import load_config

from .generate import ToyConfig, generate


def parse_args(argv: list[str] | None = None) -> tuple[str, ToyConfig, int, bool]:
    p = argparse.ArgumentParser(prog="python -m ov3common.toyworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (e.g. data/toy)")
    p.add_argument("--config", default=None, help="YAML with ToyConfig keys (e.g. configs/data/toy.yaml)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (the output does not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of ToyConfig")
    defaults = ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None,
                       help=f"(default {getattr(defaults, f.name)})")
    args = p.parse_args(argv)
    flags = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(ToyConfig)
             if getattr(args, f.name) is not None]
    cfg = load_config(ToyConfig, args.config, flags + list(args.overrides))
    return args.out, ToyConfig(**OmegaConf.to_container(cfg)), args.workers, not args.quiet


def main(argv: list[str] | None = None) -> None:
    out, cfg, workers, progress = parse_args(argv)
    meta = generate(out, cfg, workers=workers, progress=progress)
    n = sum(meta["counts"]["images"].values()) + sum(meta["counts"]["classes"].values())
    print(json.dumps({"out": out, "total_images": n, "seconds": meta["seconds"],
                      "images_per_s": round(n / max(meta["seconds"], 1e-9), 1), "timings": meta["timings"],
                      **meta["counts"]}))


if __name__ == "__main__":
    main()
