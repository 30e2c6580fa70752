"""Single-turn 4-choice records on the toy world's training images, for a letter-heavy LLaVA stage 2.

    python -m ov3common.toyworld.letters --shards data/toy/wds/train --n 20000 --out data/toy/llava/letters.json

Each record is ``<image>`` + a SeedBench-format question (the toy world's own generators; answer letter uniform) →
the letter, in the LLaVA JSON format that ``data.train`` reads (images relative to ``data/toy/images``). Measured
(docs/notes/llava-toy.md): 20k of them added to stage 2 on the 4-layer toy LM (``configs/llava/toy_llm_mini.yaml``,
``toy_stage{1,2}_letters.yaml``) take the letter protocol from chance to 45.7 % (blind control 27.7 %), at the cost of
POPE F1 and ~2x the stage-2 time; the 2-layer LM stays at chance with them. ``make demo`` does not use them.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ov3common.checkpoint import atomic_write_json
from ov3common.toyworld.generate import load_scenes
from ov3common.toyworld.llava import letter_record


def letter_records(shards: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` records on the scenes of the webdataset shards under ``shards`` (each sample's json: key, split, scene)."""
    metas = load_scenes(shards, "--shards")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    while len(out) < n:
        meta = metas[int(rng.integers(len(metas)))]
        rec = letter_record(f"letters_{len(out):07d}", f"{meta['split']}/{meta['key']}.jpg", meta["scene"], rng)
        if rec is not None:
            out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/toy/wds/train")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/toy/llava/letters.json")
    args = ap.parse_args(argv)
    try:
        records = letter_records(args.shards, args.n, args.seed)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    atomic_write_json(args.out, records)
    print(f"{len(records)} single-turn 4-choice records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
