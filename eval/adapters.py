"""The sibling packages behind the small interfaces :mod:`eval.eval_all` calls, and the benchmark prediction CLI.

* predictor: ``llava_predictor(run_dir, device, batch_size=8, max_new_tokens=16) -> predict(records) -> list[str]``
  (records from :mod:`eval.benchmarks`; greedy answers of a trained LLaVA folder: :func:`predict_answers`).
* ranker: ``llava_ranker(run_dir, device, batch_size=8) -> predict(records) -> list[str]`` (SeedBench by
  likelihood ranking, ours: the letter of the most likely choice text, :func:`rank_answers`).
* sampler: ``rae_sampler(run_dir, device, seed=0, steps=0, cfg_scale=-1.0) -> (generate(labels), class_names)``
  (``rae_generation.sample.load_generator``; ``steps=0`` / ``cfg_scale<0`` keep the run's defaults; sample i's noise
  is a function of (seed, i) only, so the set does not depend on the batch size); ``generate.manifest`` holds the
  generator's part of the sampling manifest (:func:`rae_generation.sample.manifest_fields`).

:func:`predict_answers` / :func:`rank_answers` are the one prediction path: eval-all, the CLI below and the LLaVA
trainer's in-training evaluation (:mod:`eval.llava_live`) all call them, so their numbers agree.

    python -m eval.adapters --model runs/toy/llava/stage2 --benchmark pope \\
        --data data/toy/pope/pope.jsonl --out runs/toy/llava/pope_predictions.jsonl

SeedBench has two protocols: ``--protocol generate`` (LLaVA-1.5 / lmms-eval: lettered choices in the prompt, the
model writes the letter; ``--blank-image``: the blind control) and ``--protocol rank`` (likelihood ranking, ours:
every choice's text is scored by the sum of its tokens' log-probabilities, no ``</s>``, as the answer to the bare
question with the short-answer suffix, and the most likely one is the prediction; its letter is written; close to
SEED-Bench's likelihood evaluation and lmms-eval's ``seedbench_ppl``, not their exact prompt). Each output line has
``question_id, answer, prediction, category`` (+ ``choices`` for SeedBench), for ``python -m eval.score``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from PIL import Image

from eval.benchmarks import load_image, load_pope, load_seedbench, write_predictions
from llava_bridge.generate import answer, rank_choices
from llava_bridge.model import load_llava
from ov3common.log import get_logger, progress
from rae_generation.sample import load_generator, manifest_fields

log = get_logger("eval.adapters")


# ---------------------------------------------------------------------------------------------------- LLaVA
def blank_like(image: Image.Image) -> Image.Image:
    """A uniform mid-grey image of the same size: the blind control (what the model answers without seeing)."""
    return Image.new("RGB", image.size, (128, 128, 128))


def predict_answers(model, tokenizer, records: list[dict], batch_size: int = 8, max_new_tokens: int = 16,
                    chunk: int = 256, blank: bool = False) -> list[str]:
    """Greedy answers of ``model`` to the records' prompts (+ images, decoded ``chunk`` at a time; every image
    replaced by :func:`blank_like` when ``blank``: the blind control)."""
    out: list[str] = []
    with progress(total=len(records), desc="llava predict") as bar:
        for s in range(0, len(records), chunk):
            part = records[s:s + chunk]
            images = [load_image(r["image"]) for r in part]
            if blank:
                images = [blank_like(im) for im in images]
            out += answer(model, tokenizer, images, [r["prompt"] for r in part],
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
            bar.update(len(part))
    return out


def rank_answers(model, tokenizer, records: list[dict], batch_size: int = 8) -> list[str]:
    """SeedBench by answer ranking: the letter of the most likely choice text for each record."""
    out: list[str] = []
    per = max(1, batch_size // max((len(r["choices"]) for r in records), default=1))  # questions per batch
    with progress(total=len(records), desc="rank choices") as bar:
        for s in range(0, len(records), per):
            part = records[s:s + per]
            ranked = rank_choices(model, tokenizer, [load_image(r["image"]) for r in part],
                                  [r["answer_prompt"] for r in part], [list(r["choices"].values()) for r in part],
                                  batch_size)
            out += [list(r["choices"])[best] for r, (best, _) in zip(part, ranked)]
            bar.update(len(part))
    return out


def llava_predictor(run_dir: str, device: str, batch_size: int = 8, max_new_tokens: int = 16,
                    chunk: int = 256) -> Callable[[list[dict]], list[str]]:
    """Greedy answers of the LLaVA model folder ``run_dir`` to the records' prompts (images decoded per chunk)."""
    model, tok = load_llava(run_dir, device=device)
    return lambda records: predict_answers(model, tok, records, batch_size, max_new_tokens, chunk)


def llava_ranker(run_dir: str, device: str, batch_size: int = 8) -> Callable[[list[dict]], list[str]]:
    """SeedBench answer ranking with the LLaVA model folder ``run_dir`` (letters of the most likely choices)."""
    model, tok = load_llava(run_dir, device=device)
    return lambda records: rank_answers(model, tok, records, batch_size)


def load_records(benchmark: str, data: str, image_root: str | None, limit: int | None) -> list[dict]:
    if benchmark == "pope":
        return load_pope(data, image_root=image_root, limit_per_category=limit)
    if benchmark == "seedbench":
        return load_seedbench(data, image_root=image_root, limit_per_category=limit)
    raise ValueError(f"benchmark must be pope or seedbench, got {benchmark!r}")


# ---------------------------------------------------------------------------------------------------- RAE
def rae_sampler(run_dir: str, device: str, seed: int = 0, steps: int = 0, cfg_scale: float = -1.0
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[str]]:
    """Class-conditional sampling from an RAE run folder (EMA weights of its latest checkpoint)."""
    gen = load_generator(run_dir, device=device)
    done = [0]

    def generate(labels: torch.Tensor) -> torch.Tensor:
        x = gen.sample(labels, steps=steps or None, cfg_scale=None if cfg_scale < 0 else cfg_scale, seed=seed,
                       batch_size=len(labels), offset=done[0])
        done[0] += len(labels)
        return x

    generate.manifest = manifest_fields(gen, steps or None, None if cfg_scale < 0 else cfg_scale)
    return generate, list(gen.class_names)


# ---------------------------------------------------------------------------------------------------- CLI
def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The options every LLaVA prediction CLI shares (this one and ``eval.llava_predict``)."""
    ap.add_argument("--image-root", default=None)
    ap.add_argument("--limit-per-category", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--vision-tower", default=None, help="override mm_vision_tower from config.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weights dtype (the training dtype reproduces the in-training eval exactly)")


def run_protocol(model, tok, records: list[dict], protocol: str, batch_size: int, max_new_tokens: int,
                 blank: bool = False) -> list[str]:
    """Predictions of one protocol: ``rank`` (likelihood ranking, ours) or ``generate`` (``blank``: the blind
    control)."""
    if protocol == "rank":
        return rank_answers(model, tok, records, batch_size)
    return predict_answers(model, tok, records, batch_size, max_new_tokens, blank=blank)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.adapters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--benchmark", required=True, choices=("pope", "seedbench"))
    ap.add_argument("--data", required=True, help="benchmark file/folder (JSONL, parquet, save_to_disk)")
    ap.add_argument("--out", required=True, help="predictions JSONL for eval.score")
    ap.add_argument("--protocol", choices=("generate", "rank"), default="generate",
                    help="SeedBench: generate the letter (LLaVA-1.5) or rank the choices' texts (likelihood ranking, ours)")
    ap.add_argument("--blank-image", action="store_true",
                    help="the blind control: every image replaced by a uniform grey one of the same size")
    add_run_args(ap)
    a = ap.parse_args(argv)
    if a.protocol == "rank" and a.benchmark != "seedbench":
        ap.error("--protocol rank is for SeedBench (multiple choice)")
    if a.protocol == "rank" and a.blank_image:
        ap.error("--blank-image is for --protocol generate")
    records = load_records(a.benchmark, a.data, a.image_root, a.limit_per_category)
    model, tok = load_llava(a.model, a.vision_tower, getattr(torch, a.dtype), a.device)
    preds = run_protocol(model, tok, records, a.protocol, a.batch_size, a.max_new_tokens, a.blank_image)
    path = write_predictions(records, preds, a.out)
    log.info("%d %s predictions -> %s", len(preds), a.benchmark, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
