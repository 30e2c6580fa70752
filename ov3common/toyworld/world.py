"""The toy world's vocabulary and its scene sampler.

A scene is a plain JSON-able dict (the "scene graph"); it fully determines the rendered image, so
``render_scene(scene, res)`` and every text derived from it are pure functions of the scene, and the scene
is a pure function of ``(split seed, index)`` (see :func:`scene_rng`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GENERATOR_VERSION = "toyworld-1.2"  # 1.1: object-centric class split; 1.2: llava/letters.json

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 130, 10),
    "yellow": (235, 195, 0),
    "green": (35, 155, 55),
    "blue": (35, 85, 220),
    "purple": (135, 55, 185),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, float] = {"small": 0.55, "large": 0.88}  # object extent as a fraction of a grid cell
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
CLASS_EXTENT: tuple[float, float] = (0.26, 0.34)  # class split: object extent, a fraction of the image
CLASS_JITTER: float = 0.08  # class split: largest offset of the object's centre from the image centre
# (top colour, bottom colour); equal colours = a solid background
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((250, 250, 250), (250, 250, 250)),
    "light gray": ((218, 218, 218), (218, 218, 218)),
    "cream": ((247, 238, 210), (247, 238, 210)),
    "pale blue": ((208, 226, 246), (208, 226, 246)),
    "pale green": ((212, 240, 212), (212, 240, 212)),
    "pale pink": ((250, 218, 228), (250, 218, 228)),
    "blue gradient": ((165, 200, 245), (242, 246, 255)),
    "peach gradient": ((252, 222, 176), (250, 196, 204)),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COL_NAMES: tuple[str, ...] = ("left", "center", "right")
POSITION_NAMES: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Theme:
    """A scene theme: objects (colour shape) and backgrounds it favours, so some objects co-occur."""

    name: str
    objects: tuple[str, ...]
    backgrounds: tuple[str, ...]


THEMES: tuple[Theme, ...] = (
    Theme("traffic", ("red circle", "yellow circle", "green circle", "red triangle", "orange diamond",
                      "black square"), ("light gray", "white")),
    Theme("playing cards", ("red heart", "red diamond", "black heart", "black cross", "black diamond",
                            "red star"), ("white", "pale green")),
    Theme("night sky", ("yellow star", "yellow circle", "blue star", "purple star", "blue circle",
                        "black star"), ("blue gradient", "light gray")),
    Theme("garden", ("green heart", "green triangle", "red circle", "yellow star", "purple circle",
                     "brown square"), ("pale green", "cream")),
    Theme("beach", ("yellow circle", "orange star", "blue square", "brown triangle", "blue triangle",
                    "orange circle"), ("peach gradient", "pale blue")),
    Theme("candy shop", ("purple heart", "red heart", "orange circle", "yellow star", "green diamond",
                         "purple circle"), ("pale pink", "peach gradient")),
    Theme("office", ("black square", "blue square", "brown square", "black hexagon", "blue triangle",
                     "black cross"), ("white", "light gray")),
    Theme("hospital", ("red cross", "green cross", "blue cross", "red heart", "blue hexagon",
                       "green circle"), ("white", "pale blue")),
)
THEME_NAMES: tuple[str, ...] = tuple(t.name for t in THEMES)

# every object ("colour shape") and every class ("colour_shape"), in one fixed (alphabetical) order, so the
# class index equals torchvision ImageFolder's index over classes/<split>/<class_name>/
OBJECTS: tuple[str, ...] = tuple(sorted(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES))
CLASSES: tuple[str, ...] = tuple(o.replace(" ", "_") for o in OBJECTS)
OBJECT_INDEX: dict[str, int] = {o: i for i, o in enumerate(OBJECTS)}

SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3, "classes_train": 4, "classes_val": 5}
N_OBJECT_PROBS = (0.3, 0.3, 0.2, 0.2)  # P(1..4 objects)
P_THEME_OBJECT = 0.8  # each object comes from the theme's list with this probability, else uniform
P_THEME_BACKGROUND = 0.7

for _t in THEMES:  # vocabulary sanity, checked at import
    assert all(o in OBJECT_INDEX for o in _t.objects), _t
    assert all(b in BACKGROUNDS for b in _t.backgrounds), _t


def split_seed(seed: int, split: str) -> int:
    """The seed of one split: distinct for every (seed >= 0, split) pair, so the streams never overlap."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed * 16 + SPLIT_CODES[split]


def scene_rng(sseed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Per-index generator; ``stream`` separates the scene (0) from text noise (1), QA (2), ..."""
    return np.random.default_rng([sseed, index, stream])


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange star", "a red circle")."""
    return "an" if word[:1] in "aeiou" else "a"


def object_name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _pick(rng: np.random.Generator, probs: tuple[float, ...]) -> int:
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def make_object(rng: np.random.Generator, name: str, cell: int, size: str) -> dict:
    """One object dict with a jittered bbox (normalised [0, 1] image coordinates, rounded to 1e-4)."""
    row, col = divmod(cell, 3)
    extent = SIZES[size] / 3.0
    slack = (1.0 / 3.0 - extent) * 0.8
    cx = (col + 0.5) / 3.0 + (rng.random() - 0.5) * slack
    cy = (row + 0.5) / 3.0 + (rng.random() - 0.5) * slack
    return _object(name, cell, size, cx, cy, extent)


def _object(name: str, cell: int, size: str, cx: float, cy: float, extent: float) -> dict:
    """The object dict for a square bbox of side ``extent`` centred at (cx, cy) (rounded to 1e-4)."""
    color, shape = name.split(" ")
    row, col = divmod(cell, 3)
    bbox = [round(v, 4) for v in (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)]
    return {"name": name, "color": color, "shape": shape, "size": size, "row": row, "col": col,
            "position": POSITION_NAMES[cell], "bbox": bbox}


def relations(objects: list[dict]) -> list[dict]:
    """Canonical pairwise relations: "left of" (smaller column) and "above" (smaller row)."""
    out = []
    for a in objects:
        for b in objects:
            if a is b:
                continue
            if a["col"] < b["col"]:
                out.append({"subject": a["name"], "relation": "left of", "object": b["name"]})
            if a["row"] < b["row"]:
                out.append({"subject": a["name"], "relation": "above", "object": b["name"]})
    return out


def sample_scene(rng: np.random.Generator) -> dict:
    """A random scene: theme, background, 1-4 distinct objects in distinct cells (row-major order)."""
    theme = THEMES[int(rng.integers(len(THEMES)))]
    n = 1 + _pick(rng, N_OBJECT_PROBS)
    if rng.random() < P_THEME_BACKGROUND:
        background = theme.backgrounds[int(rng.integers(len(theme.backgrounds)))]
    else:
        background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    cells = sorted(int(c) for c in rng.permutation(9)[:n])
    names: list[str] = []
    for _ in range(n):
        pool = theme.objects if rng.random() < P_THEME_OBJECT else OBJECTS
        pool = [o for o in pool if o not in names] or [o for o in OBJECTS if o not in names]
        names.append(pool[int(rng.integers(len(pool)))])
    objects = [make_object(rng, name, cell, SIZE_NAMES[int(rng.integers(2))]) for name, cell in zip(names, cells)]
    return {"theme": theme.name, "background": background, "objects": objects, "relations": relations(objects)}


def single_object_scene(rng: np.random.Generator, name: str) -> dict:
    """A one-object scene of a given object (class-conditional split), object-centric like ImageNet's photos: the
    object near the centre (offset up to ``CLASS_JITTER`` of the image), extent drawn from ``CLASS_EXTENT``, random
    background.

    Why not a random cell and size as in the scenes: at 64 px the encoder's tokens are 16 px wide, and a 12–19 px
    object in one of nine cells lands on one token at a random place; the toy generator then learned the class
    poorly (toyworld 1.0: 0.34 class accuracy of its tokens, 0.61 for the tokens of real images)."""
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    extent = float(rng.uniform(*CLASS_EXTENT))
    cx, cy = (0.5 + float(rng.uniform(-CLASS_JITTER, CLASS_JITTER)) for _ in range(2))
    obj = _object(name, 4, "large", cx, cy, extent)  # cell 4 = the centre
    return {"theme": None, "background": background, "objects": [obj], "relations": []}


def class_label(scene: dict) -> int | None:
    """The class index (shape x colour) of a single-object scene, else None."""
    objs = scene["objects"]
    return OBJECT_INDEX[objs[0]["name"]] if len(objs) == 1 else None
