"""POPE and SeedBench-style eval sets (lmms-eval columns) from the test split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .questions import (
    LETTERS,
    MC_GENERATORS,
    POPE_CATEGORIES,
    SEED_CATEGORIES,
    ObjectStats,
    arrange,
    negatives,
)
from .questions import pope_question as _pope_q

POPE_POSITIVES = 3


def build_pope(scenes: Sequence[dict], images: Sequence[str], stats: ObjectStats, n_images: int,
               seed: int) -> list[dict]:
    """POPE's protocol: per image up to 3 positives, the same positives in every category, and as many
    negatives chosen by the category's rule (random / popular / adversarial). Images with >= 3 objects
    come first (as POPE picks images with >= 3 ground-truth objects), then the rest in index order."""
    order = [i for i, s in enumerate(scenes) if len(s["objects"]) >= POPE_POSITIVES]
    order += [i for i, s in enumerate(scenes) if len(s["objects"]) < POPE_POSITIVES]
    chosen = sorted(order[:n_images])
    rows: list[dict] = []
    for category in POPE_CATEGORIES:
        for i in chosen:
            scene = scenes[i]
            rng = np.random.default_rng([seed, i, 7])  # same positives in every category
            objs = [o["name"] for o in scene["objects"]]
            pos = [objs[int(j)] for j in sorted(rng.permutation(len(objs))[:POPE_POSITIVES])]
            neg_rng = np.random.default_rng([seed, i, 8, POPE_CATEGORIES.index(category)])
            neg = negatives(scene, len(pos), category, neg_rng, stats)
            for name, answer in [(p, "yes") for p in pos] + [(n, "no") for n in neg]:
                rows.append({"question_id": str(len(rows)), "question": _pope_q(name), "answer": answer,
                             "image": images[i], "image_source": images[i].rsplit("/", 1)[-1].split(".")[0],
                             "category": category, "object": name})
    return rows


def build_seedbench(scenes: Sequence[dict], images: Sequence[str], per_category: int, seed: int) -> list[dict]:
    """``per_category`` 4-choice questions per category; the answer letter cycles A, B, C, D inside each
    category (balanced within +-1); the images of each category are a seeded permutation of the split."""
    rows: list[dict] = []
    for c, (category, type_id) in enumerate(SEED_CATEGORIES.items()):
        order = np.random.default_rng([seed, 100 + c]).permutation(len(scenes))
        made = 0
        for i in (int(j) for j in order):
            if made == per_category:
                break
            rng = np.random.default_rng([seed, i, 200 + c])
            mc = MC_GENERATORS[category](scenes[i], rng)
            if mc is None:
                continue
            question, correct, wrong = mc
            letter = made % 4
            choices = arrange(correct, wrong, letter, rng)
            rows.append({"question_id": str(len(rows)), "question": question,
                         "choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2],
                         "choice_d": choices[3], "answer": LETTERS[letter], "image": images[i],
                         "category": category, "question_type_id": type_id, "data_type": "image",
                         "data_id": images[i]})
            made += 1
    return rows
