"""Texts of a scene: a noisy web-like alt-text, a short exact caption and an exact long recaption."""

from __future__ import annotations

import numpy as np

from .world import NUMBER_WORDS, article

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circle", "round", "dot", "ball", "disc"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangular shape"),
    "star": ("star", "star", "star shape"),
    "heart": ("heart", "heart", "love heart"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "hexagon": ("hexagon", "hexagon", "hex"),
    "cross": ("cross", "cross", "plus sign", "plus"),
}
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "red", "crimson", "scarlet"),
    "orange": ("orange", "orange", "tangerine"),
    "yellow": ("yellow", "yellow", "golden"),
    "green": ("green", "green", "emerald"),
    "blue": ("blue", "blue", "royal blue"),
    "purple": ("purple", "purple", "violet"),
    "brown": ("brown", "brown", "chocolate"),
    "black": ("black", "black", "dark"),
}
TAGS: tuple[str, ...] = (
    "clipart", "icon", "vector", "stock photo", "free download", "hd wallpaper", "png", "royalty free",
    "illustration", "cute", "simple design", "flat design", "kids", "pattern", "shapes", "#shapes", "#art",
    "logo", "sticker", "new", "sale", "best price", "high quality", "background", "wallpaper",
)
IRRELEVANT: tuple[str, ...] = (
    "untitled", "image", "click to enlarge", "see more", "photo by user", "dsc 0 1 2 3 jpg", "home page",
    "view full size", "thumbnail", "no description available",
)
ALT_TEMPLATES: tuple[str, ...] = (
    "{objs}", "{objs}", "{objs} {tag}", "{tag} {objs}", "{objs} on {bg}", "a {objs}", "{objs} - {tag}",
    "picture of {objs}", "{objs} {tag} {tag2}", "{objs}, {bg} background", "{theme} {objs}",
    "{objs} | {theme} {tag}",
)
JOINERS: tuple[str, ...] = (", ", " and ", " & ", " with ", " ")


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def alt_text(scene: dict, rng: np.random.Generator) -> str:
    """A short noisy web-like caption: synonyms, word drops, missing objects, tags, sometimes junk."""
    if rng.random() < 0.03:
        return _choice(rng, IRRELEVANT)
    objs = list(scene["objects"])
    if len(objs) > 1 and rng.random() < 0.2:  # a missing object
        objs.pop(int(rng.integers(len(objs))))
    if len(objs) > 2 and rng.random() < 0.3:
        objs = objs[:2]
    phrases = []
    for o in objs:
        words = []
        if rng.random() < 0.25:
            words.append(o["size"])
        if rng.random() > 0.1:  # colour word drop
            words.append(_choice(rng, COLOR_SYNONYMS[o["color"]]))
        words.append(_choice(rng, SHAPE_SYNONYMS[o["shape"]]))
        phrases.append(" ".join(words))
    joiner = _choice(rng, JOINERS)
    text = _choice(rng, ALT_TEMPLATES).format(
        objs=joiner.join(phrases), tag=_choice(rng, TAGS), tag2=_choice(rng, TAGS), bg=scene["background"],
        theme=scene["theme"] or _choice(rng, TAGS))
    if rng.random() < 0.3:
        text = text.title()
    elif rng.random() < 0.2:
        text = text.capitalize()
    return text


def _article(obj: dict) -> str:
    return f"a {obj['size']} {obj['name']}"


def short_caption(scene: dict) -> str:
    """One exact sentence: every object (size, colour, shape) and the background."""
    phrases = [_article(o) for o in scene["objects"]]
    if len(phrases) == 1:
        listing = phrases[0]
    else:
        listing = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listing[0].upper()}{listing[1:]} on a {scene['background']} background."


def relation_sentence(rel: dict) -> str:
    rel_text = "to the left of" if rel["relation"] == "left of" else "above"
    return f"The {rel['subject']} is {rel_text} the {rel['object']}."


def recaption(scene: dict, rng: np.random.Generator, max_relations: int = 3) -> str:
    """The exact long description: count, background, every object with size/colour/shape/position,
    a few spatial relations, and the theme when the scene has one."""
    objs = scene["objects"]
    n = len(objs)
    if n == 1:
        parts = [f"The image shows a single object on a {scene['background']} background."]
    else:
        parts = [f"The image shows {NUMBER_WORDS[n]} objects on a {scene['background']} background."]
    for o in objs:
        where = "in the center" if o["position"] == "center" else f"in the {o['position']}"
        parts.append(f"There is {_article(o)} {where}.")
    rels = scene["relations"]
    if rels:
        k = min(max_relations, len(rels))
        for i in sorted(int(j) for j in rng.permutation(len(rels))[:k]):
            parts.append(relation_sentence(rels[i]))
    if scene.get("theme"):
        parts.append(f"The scene has {article(scene['theme'])} {scene['theme']} theme.")
    return " ".join(parts)
