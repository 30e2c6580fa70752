"""``make llava-predict``: every LLaVA protocol the report reads, in one process (the model is loaded once).

    python -m eval.llava_predict --model runs/toy/llava/ov3 --pope data/toy/pope/pope.jsonl \\
        --seedbench data/toy/seedbench/seedbench.jsonl --limit-per-category 150

Writes, beside the model (or under ``--out-dir``), ``{name}_predictions.jsonl`` + ``{name}_scores.json`` for
``pope`` (generate), ``seedbench`` (letter generation, LLaVA-1.5's prompt), ``seedbench_rank`` (likelihood ranking,
ours) and ``seedbench_blind`` (letter generation, every image replaced by a uniform grey one: the blind control).
The files are the ones ``python -m eval.adapters`` + ``python -m eval.score`` write per protocol (the same functions;
tests/test_llava_eval.py checks they are identical), without loading torch, the model and the benchmarks four times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eval.adapters import add_run_args, load_records, run_protocol
from eval.benchmarks import write_predictions
from eval.score import score_file
from llava_bridge.model import load_llava
from ov3common.checkpoint import atomic_write_json
from ov3common.log import get_logger

log = get_logger("eval.llava_predict")
# (output name, benchmark, protocol, blank images)
PROTOCOLS = (("pope", "pope", "generate", False), ("seedbench", "seedbench", "generate", False),
             ("seedbench_rank", "seedbench", "rank", False), ("seedbench_blind", "seedbench", "generate", True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.llava_predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a LLaVA folder (stage 2, LoRA or stage 1)")
    ap.add_argument("--pope", required=True, help="POPE file/folder (JSONL, parquet, save_to_disk)")
    ap.add_argument("--seedbench", required=True, help="SeedBench file/folder")
    ap.add_argument("--out-dir", default=None, help="where the files go (default: the model folder)")
    add_run_args(ap)
    a = ap.parse_args(argv)
    records = {b: load_records(b, path, a.image_root, a.limit_per_category)
               for b, path in (("pope", a.pope), ("seedbench", a.seedbench))}
    model, tok = load_llava(a.model, a.vision_tower, getattr(torch, a.dtype), a.device)
    out = Path(a.out_dir or a.model)
    for name, bench, protocol, blank in PROTOCOLS:
        recs = records[bench]
        preds = run_protocol(model, tok, recs, protocol, a.batch_size, a.max_new_tokens, blank)
        path = write_predictions(recs, preds, out / f"{name}_predictions.jsonl")
        scores = score_file(bench, path)
        atomic_write_json(out / f"{name}_scores.json", scores)
        headline = scores["mean_f1"] if bench == "pope" else scores["all"]
        log.info("%s: %d predictions -> %s (%s %.4f)", name, len(preds), path,
                 "mean F1" if bench == "pope" else "accuracy", headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
