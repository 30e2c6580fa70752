"""Questions about a scene: POPE-style negatives, SeedBench-style 4-choice questions, short VQA answers.

Shared by the eval sets (test split) and the LLaVA instruction mix (train split), so the model is trained on
exactly the formats it is evaluated on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .world import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    OBJECT_INDEX,
    OBJECTS,
    POSITION_NAMES,
    SHAPES,
    SIZE_NAMES,
    THEMES,
    article,
)

SHORT_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")
POPE_CATEGORIES = ("random", "popular", "adversarial")
SEED_CATEGORIES: dict[str, int] = {  # SEED-Bench's question_type_id for the image dimensions we mirror
    "scene": 1, "identity": 2, "attribute": 3, "location": 4, "counting": 5, "spatial relation": 6,
}
REL_CHOICES = ("to the left of it", "to the right of it", "above it", "below it")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}


def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _sample(rng: np.random.Generator, seq: Sequence, k: int) -> list:
    return [seq[int(i)] for i in rng.permutation(len(seq))[:k]]


# ------------------------------------------------------------------ dataset statistics (train split)
@dataclass
class ObjectStats:
    """Per-object image frequency and pairwise co-occurrence counts over a set of scenes."""

    frequency: np.ndarray  # [n_objects] int64: images containing the object
    cooccurrence: np.ndarray  # [n_objects, n_objects] int64: images containing both (diagonal = frequency)

    @classmethod
    def from_scenes(cls, scenes: Sequence[dict]) -> ObjectStats:
        n = len(OBJECTS)
        co = np.zeros((n, n), np.int64)
        for s in scenes:
            idx = [OBJECT_INDEX[o["name"]] for o in s["objects"]]
            co[np.ix_(idx, idx)] += 1
        return cls(frequency=co.diagonal().copy(), cooccurrence=co)

    def to_json(self) -> dict:
        return {"objects": list(OBJECTS), "frequency": self.frequency.tolist(),
                "cooccurrence": self.cooccurrence.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> ObjectStats:
        if list(d["objects"]) != list(OBJECTS):
            raise ValueError("stats were computed for a different object vocabulary")
        return cls(np.asarray(d["frequency"], np.int64), np.asarray(d["cooccurrence"], np.int64))


def negatives(scene: dict, k: int, rule: str, rng: np.random.Generator, stats: ObjectStats) -> list[str]:
    """``k`` objects absent from the scene, chosen by POPE's rule (random / popular / adversarial)."""
    present = [OBJECT_INDEX[o["name"]] for o in scene["objects"]]
    absent = np.array([i for i in range(len(OBJECTS)) if i not in present])
    if rule == "random":
        chosen = absent[rng.permutation(len(absent))[:k]]
    elif rule == "popular":  # most frequent in the training set; ties by vocabulary order
        chosen = absent[np.lexsort((absent, -stats.frequency[absent]))][:k]
    elif rule == "adversarial":  # most co-occurring with the scene's objects, then most frequent
        score = stats.cooccurrence[np.ix_(present, absent)].sum(0)
        chosen = absent[np.lexsort((absent, -stats.frequency[absent], -score))][:k]
    else:
        raise ValueError(f"unknown POPE rule {rule!r}; expected one of {POPE_CATEGORIES}")
    return [OBJECTS[int(i)] for i in chosen]


def pope_question(name: str) -> str:
    return f"Is there {article(name)} {name} in the image?"


# ------------------------------------------------------------------ 4-choice questions
MC = tuple[str, str, list[str]]  # (question, correct choice, 3 distractors)


def _absent(scene: dict) -> list[str]:
    present = {o["name"] for o in scene["objects"]}
    return [o for o in OBJECTS if o not in present]


def in_theme(scene: dict, theme) -> bool:
    return all(o["name"] in theme.objects for o in scene["objects"])


def mc_scene(scene: dict, rng: np.random.Generator) -> MC | None:
    theme = next((t for t in THEMES if t.name == scene.get("theme")), None)
    wrong_themes = [t.name for t in THEMES if not in_theme(scene, t)]
    if theme is not None and in_theme(scene, theme) and len(wrong_themes) >= 3 and rng.random() < 0.5:
        return "Which theme best fits this scene?", theme.name, _sample(rng, wrong_themes, 3)
    others = [b for b in BACKGROUND_NAMES if b != scene["background"]]
    return "What is the background of the image?", scene["background"], _sample(rng, others, 3)


def mc_identity(scene: dict, rng: np.random.Generator) -> MC:
    objs, absent = scene["objects"], _absent(scene)
    if len(objs) >= 3 and rng.random() < 0.3:
        return ("Which object is not in the image?", _choice(rng, absent),
                _sample(rng, [o["name"] for o in objs], 3))
    obj = _choice(rng, objs)
    same_shape = [a for a in absent if a.endswith(" " + obj["shape"])]
    same_color = [a for a in absent if a.startswith(obj["color"] + " ")]
    wrong = [_choice(rng, same_shape), _choice(rng, same_color)]
    wrong.append(_choice(rng, [a for a in absent if a not in wrong]))
    return "Which object can be seen in the image?", obj["name"], wrong


def mc_attribute(scene: dict, rng: np.random.Generator) -> MC:
    objs = scene["objects"]
    shape_count = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    unique = [o for o in objs if shape_count[o["shape"]] == 1]
    if unique and rng.random() < 0.5:
        obj = _choice(rng, unique)
        wrong = _sample(rng, [c for c in COLOR_NAMES if c != obj["color"]], 3)
        return f"What color is the {obj['shape']}?", obj["color"], wrong
    obj = _choice(rng, objs)
    other_size = next(s for s in SIZE_NAMES if s != obj["size"])
    c1, c2 = _sample(rng, [c for c in COLOR_NAMES if c != obj["color"]], 2)
    wrong = [f"{other_size} and {obj['color']}", f"{obj['size']} and {c1}", f"{other_size} and {c2}"]
    return (f"Which best describes the {obj['shape']} in the {obj['position']}?",
            f"{obj['size']} and {obj['color']}", wrong)


def mc_location(scene: dict, rng: np.random.Generator) -> MC:
    objs = scene["objects"]
    obj = _choice(rng, objs)
    if rng.random() < 0.3:
        others = [o["name"] for o in objs if o is not obj]
        others += _sample(rng, _absent(scene), 3 - len(others)) if len(others) < 3 else []
        return f"Which object is in the {obj['position']}?", obj["name"], _sample(rng, others, 3)
    wrong = _sample(rng, [p for p in POSITION_NAMES if p != obj["position"]], 3)
    return f"Where is the {obj['name']} in the image?", obj["position"], wrong


def mc_counting(scene: dict, rng: np.random.Generator) -> MC:
    objs = scene["objects"]
    if rng.random() < 0.35:
        color = _choice(rng, objs)["color"] if rng.random() < 0.8 else _choice(rng, COLOR_NAMES)
        n = sum(o["color"] == color for o in objs)
        question = f"How many {color} objects are there in the image?"
        pool = [str(i) for i in range(0, 5) if i != n]
    else:
        n = len(objs)
        question = "How many objects are there in the image?"
        pool = [str(i) for i in range(1, 7) if i != n]
    return question, str(n), _sample(rng, pool, 3)


def _rel_index(a: dict, b: dict) -> int | None:
    """Index into REL_CHOICES of a relative to b when exactly one relation holds, else None."""
    if a["row"] == b["row"]:
        return 0 if a["col"] < b["col"] else 1
    if a["col"] == b["col"]:
        return 2 if a["row"] < b["row"] else 3
    return None


def satisfies(a: dict, rel: str, b: dict) -> bool:
    return {"left": a["col"] < b["col"], "right": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


REL_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def mc_spatial(scene: dict, rng: np.random.Generator) -> MC | None:
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    aligned = [(a, b) for a in objs for b in objs if a is not b and _rel_index(a, b) is not None]
    if aligned and rng.random() < 0.5:
        a, b = _choice(rng, aligned)
        k = _rel_index(a, b)
        wrong = [c for i, c in enumerate(REL_CHOICES) if i != k]
        return f"Where is the {a['name']} relative to the {b['name']}?", REL_CHOICES[k], wrong
    options = [(rel, x) for x in objs for rel in REL_PHRASES
               if any(satisfies(y, rel, x) for y in objs if y is not x)]
    rel, x = _choice(rng, options)
    good = [y for y in objs if y is not x and satisfies(y, rel, x)]
    bad = [y["name"] for y in objs if y is not x and not satisfies(y, rel, x)]
    bad += _sample(rng, _absent(scene), 3 - len(bad)) if len(bad) < 3 else []
    question = f"Which object is {REL_PHRASES[rel]} the {x['name']}?"
    return question, _choice(rng, good)["name"], _sample(rng, bad, 3)


MC_GENERATORS: dict[str, Callable[[dict, np.random.Generator], MC | None]] = {
    "scene": mc_scene, "identity": mc_identity, "attribute": mc_attribute, "location": mc_location,
    "counting": mc_counting, "spatial relation": mc_spatial,
}


def arrange(correct: str, wrong: Sequence[str], letter: int, rng: np.random.Generator) -> list[str]:
    """Four choices with ``correct`` at position ``letter`` and the distractors shuffled around it."""
    if len(wrong) != 3 or correct in wrong or len(set(wrong)) != 3:
        raise ValueError(f"bad distractors for {correct!r}: {list(wrong)}")
    choices = _sample(rng, list(wrong), 3)
    choices.insert(letter, correct)
    return choices


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The SeedBench prompt (as lmms-eval builds it) ending with the letter instruction."""
    lines = [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\n" + MC_SUFFIX


# ------------------------------------------------------------------ short answers (instruction mix)
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def short_qa(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """One short question (to be followed by SHORT_SUFFIX) and its one-word/phrase answer."""
    objs = scene["objects"]
    obj = _choice(rng, objs)
    kinds = ["count", "color", "where", "size", "background", "what_at", "theme", "left"]
    for _ in range(8):
        kind = _choice(rng, kinds)
        if kind == "count":
            return "How many objects are there in the image?", str(len(objs))
        if kind == "color" and sum(o["shape"] == obj["shape"] for o in objs) == 1:
            return f"What color is the {obj['shape']}?", _cap(obj["color"])
        if kind == "where":
            return f"Where is the {obj['name']}?", _cap(obj["position"])
        if kind == "size":
            return f"Is the {obj['name']} small or large?", _cap(obj["size"])
        if kind == "background":
            return "What is the background of the image?", _cap(scene["background"])
        if kind == "what_at":
            return f"What shape is in the {obj['position']}?", _cap(obj["shape"])
        if kind == "theme" and scene.get("theme"):
            theme = next(t for t in THEMES if t.name == scene["theme"])
            if in_theme(scene, theme):
                return "What is the theme of this scene?", _cap(theme.name)
        if kind == "left" and len(objs) >= 2:
            a, b = _sample(rng, objs, 2)
            rel = _choice(rng, list(REL_PHRASES))
            return f"Is the {a['name']} {REL_PHRASES[rel]} the {b['name']}?", "Yes" if satisfies(a, rel, b) else "No"
    return "How many objects are there in the image?", str(len(objs))
