"""Batch predictions on POPE / SeedBench for ``python -m eval.score`` (LLaVA-1.5's prompts, greedy decoding).

    python -m llava_bridge.predict --model runs/toy/llava/stage2 --benchmark pope \\
        --data data/toy/pope/pope.jsonl --out runs/toy/llava/pope_predictions.jsonl

SeedBench has two protocols: ``--protocol generate`` (LLaVA-1.5 / lmms-eval: lettered choices in the prompt, the
model writes the letter) and ``--protocol rank`` (likelihood ranking, ours; close to SEED-Bench's, not its exact prompt: every choice's text is scored as the answer to
the bare question and the most likely one is the prediction; its letter is written).

Records come from ``eval.benchmarks`` (the one home of the benchmark loaders and prompts); each output line has
``question_id, answer, prediction, category`` (+ ``choices`` for SeedBench), written by
``eval.benchmarks.write_predictions``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

from llava_bridge.generate import generate_ids, rank_choices
from llava_bridge.model import load_llava
from ov3common.log import get_logger, progress

log = get_logger("llava_bridge.predict")


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform mid-grey image of the same size: the blind control (what the model answers without seeing)."""
    return Image.new("RGB", image.size, (128, 128, 128))


def predict(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 16,
            blank: bool = False) -> list[str]:
    """The model's raw answer text for each record (its ``prompt`` + its image, or a blank one when ``blank``)."""
    from eval.benchmarks import load_image

    out: list[str] = []
    bar = progress(total=len(records), desc="predict")
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        images = [load_image(r["image"]) for r in chunk]
        if blank:
            images = [blank_like(im) for im in images]
        ids = generate_ids(model, tokenizer, images, [r["prompt"] for r in chunk], max_new_tokens, len(chunk))
        out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        bar.update(len(chunk))
    bar.close()
    return out


def predict_by_ranking(model, tokenizer, records: list[dict], batch_size: int = 32) -> list[str]:
    """SeedBench by answer ranking: the letter of the most likely choice text for each record."""
    from eval.benchmarks import load_image

    out: list[str] = []
    bar = progress(total=len(records), desc="rank choices")
    per = max(1, batch_size // max((len(r["choices"]) for r in records), default=1))  # questions per batch
    for s in range(0, len(records), per):
        chunk = records[s:s + per]
        ranked = rank_choices(model, tokenizer, [load_image(r["image"]) for r in chunk],
                              [r["answer_prompt"] for r in chunk], [list(r["choices"].values()) for r in chunk],
                              batch_size)
        out += [list(r["choices"])[best] for r, (best, _) in zip(chunk, ranked)]
        bar.update(len(chunk))
    bar.close()
    return out


def load_records(benchmark: str, data: str, image_root: str | None, limit: int | None) -> list[dict]:
    from eval.benchmarks import load_pope, load_seedbench

    if benchmark == "pope":
        return load_pope(data, image_root=image_root, limit_per_category=limit)
    if benchmark == "seedbench":
        return load_seedbench(data, image_root=image_root, limit_per_category=limit)
    raise ValueError(f"benchmark must be pope or seedbench, got {benchmark!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--benchmark", required=True, choices=("pope", "seedbench"))
    ap.add_argument("--data", required=True, help="benchmark file/folder (JSONL, parquet, save_to_disk)")
    ap.add_argument("--out", required=True, help="predictions JSONL for eval.score")
    ap.add_argument("--image-root", default=None)
    ap.add_argument("--limit-per-category", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--protocol", choices=("generate", "rank"), default="generate",
                    help="SeedBench: generate the letter (LLaVA-1.5) or rank the choices' texts (SEED-Bench)")
    ap.add_argument("--blank-image", action="store_true",
                    help="the blind control: every image replaced by a uniform grey one of the same size")
    ap.add_argument("--vision-tower", default=None, help="override mm_vision_tower from config.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weights dtype (the training dtype reproduces the in-training eval exactly)")
    a = ap.parse_args(argv)
    if a.protocol == "rank" and a.benchmark != "seedbench":
        ap.error("--protocol rank is for SeedBench (multiple choice)")
    if a.protocol == "rank" and a.blank_image:
        ap.error("--blank-image is for --protocol generate")
    from eval.benchmarks import write_predictions

    records = load_records(a.benchmark, a.data, a.image_root, a.limit_per_category)
    model, tok = load_llava(a.model, a.vision_tower, getattr(torch, a.dtype), a.device)
    if a.protocol == "rank":
        preds = predict_by_ranking(model, tok, records, a.batch_size)
    else:
        preds = predict(model, tok, records, a.batch_size, a.max_new_tokens, blank=a.blank_image)
    path = write_predictions(records, preds, a.out)
    log.info("%d %s predictions -> %s", len(preds), a.benchmark, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
