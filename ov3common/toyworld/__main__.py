"""``python -m ov3common.toyworld --out data/toy [--resolution 64] [--n-train 20000] ...``"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .generate import ToyConfig, generate


def parse_args(argv: list[str] | None = None) -> tuple[str, ToyConfig, int, bool]:
    p = argparse.ArgumentParser(prog="python -m ov3common.toyworld", description=__doc__)
    p.add_argument("--out", required=True, help="output directory (e.g. data/toy)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (the output does not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    defaults = ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")
    args = p.parse_args(argv)
    cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToyConfig)})
    return args.out, cfg, args.workers, not args.quiet


def main(argv: list[str] | None = None) -> None:
    out, cfg, workers, progress = parse_args(argv)
    meta = generate(out, cfg, workers=workers, progress=progress)
    n = sum(meta["counts"]["images"].values()) + sum(meta["counts"]["classes"].values())
    print(json.dumps({"out": out, "total_images": n, "seconds": meta["seconds"],
                      "images_per_s": round(n / max(meta["seconds"], 1e-9), 1), **meta["counts"]}))


if __name__ == "__main__":
    main()
