"""Adapters from the sibling packages to the two small interfaces :mod:`eval.eval_all` calls.

* predictor: ``llava_predictor(run_dir, device, batch_size=8, max_new_tokens=16) -> predict(records) -> list[str]``
  (records from :mod:`eval.benchmarks`; greedy answers of a trained LLaVA folder via ``llava_bridge``).
* ranker: ``llava_ranker(run_dir, device, batch_size=8) -> predict(records) -> list[str]`` (SeedBench by answer
  ranking: the letter of the most likely choice text, ``llava_bridge.predict.predict_by_ranking``).
* sampler: ``rae_sampler(run_dir, device, seed=0, steps=0, cfg_scale=-1.0) -> (generate(labels), class_names)``
  (``rae_generation.sample.load_generator``; ``steps=0`` / ``cfg_scale<0`` keep the run's defaults; sample i's noise
  is a function of (seed, i) only, so the set does not depend on the batch size); ``generate.manifest`` holds the
  generator's part of the sampling manifest (:func:`rae_generation.sample.manifest_fields`).

Both import their package lazily, so ``eval`` works (and reports the piece as missing) without them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def llava_predictor(run_dir: str, device: str, batch_size: int = 8, max_new_tokens: int = 16,
                    chunk: int = 256) -> Callable[[list[dict]], list[str]]:
    """Greedy answers of the LLaVA model folder ``run_dir`` to the records' prompts (images decoded per chunk)."""
    from eval.benchmarks import load_image
    from llava_bridge.generate import answer
    from llava_bridge.model import load_llava
    from ov3common.log import progress

    model, tok = load_llava(run_dir, device=device)

    def predict(records: list[dict]) -> list[str]:
        out: list[str] = []
        for s in progress(range(0, len(records), chunk), desc="llava predict"):
            part = records[s:s + chunk]
            out += answer(model, tok, [load_image(r["image"]) for r in part], [r["prompt"] for r in part],
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
        return out

    return predict


def llava_ranker(run_dir: str, device: str, batch_size: int = 8) -> Callable[[list[dict]], list[str]]:
    """SeedBench answer ranking with the LLaVA model folder ``run_dir`` (letters of the most likely choices)."""
    from llava_bridge.model import load_llava
    from llava_bridge.predict import predict_by_ranking

    model, tok = load_llava(run_dir, device=device)
    return lambda records: predict_by_ranking(model, tok, records, batch_size)


def rae_sampler(run_dir: str, device: str, seed: int = 0, steps: int = 0, cfg_scale: float = -1.0
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[str]]:
    """Class-conditional sampling from an RAE run folder (EMA weights of its latest checkpoint)."""
    from rae_generation.sample import load_generator, manifest_fields

    gen = load_generator(run_dir, device=device)
    done = [0]

    def generate(labels: torch.Tensor) -> torch.Tensor:
        x = gen.sample(labels, steps=steps or None, cfg_scale=None if cfg_scale < 0 else cfg_scale, seed=seed,
                       batch_size=len(labels), offset=done[0])
        done[0] += len(labels)
        return x

    generate.manifest = manifest_fields(gen, steps or None, None if cfg_scale < 0 else cfg_scale)
    return generate, list(gen.class_names)
