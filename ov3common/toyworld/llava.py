"""LLaVA-format records: stage-1 caption pretraining (`plain`) and the stage-2 instruction mix."""

from __future__ import annotations

import numpy as np

from .questions import (
    LETTERS,
    MC_GENERATORS,
    POPE_CATEGORIES,
    SHORT_SUFFIX,
    ObjectStats,
    arrange,
    mc_prompt,
    negatives,
    pope_question,
    short_qa,
)
from .text import recaption, short_caption
from .world import COLOR_NAMES, NUMBER_WORDS, POSITION_NAMES, SHAPES

PRETRAIN_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this picture.",
    "What is in this image? Answer in one sentence.",
    "Give a concise description of the picture.",
    "Summarize the image in a few words.",
    "Provide a brief caption.",
)
DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Give a detailed description of everything in the picture.",
    "What objects are in the image and where are they?",
    "Explain the contents of this image thoroughly.",
)
SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SIDES = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple"}


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def pretrain_record(key: str, image: str, scene: dict, rng: np.random.Generator) -> dict:
    """``{id, image, conversations}`` with an image-only prompt and a short exact caption (plain style)."""
    return {"id": key, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + _choice(rng, PRETRAIN_PROMPTS)},
        {"from": "gpt", "value": short_caption(scene)},
    ]}


def _turn(kind: str, scene: dict, rng: np.random.Generator, stats: ObjectStats) -> tuple[str, str] | None:
    if kind == "detail":
        return _choice(rng, DETAIL_PROMPTS), recaption(scene, rng)
    if kind == "caption":
        return _choice(rng, PRETRAIN_PROMPTS), short_caption(scene)
    if kind == "pope":
        if rng.random() < 0.5:
            name = _choice(rng, scene["objects"])["name"]
            answer = "Yes"
        else:
            name = negatives(scene, 1 + int(rng.integers(3)), _choice(rng, POPE_CATEGORIES), rng, stats)[-1]
            answer = "No"
        return f"{pope_question(name)}\n{SHORT_SUFFIX}", answer
    if kind == "mc":
        gen = MC_GENERATORS[_choice(rng, list(MC_GENERATORS))]
        mc = gen(scene, rng)
        if mc is None:
            return None
        question, correct, wrong = mc
        letter = int(rng.integers(4))
        return mc_prompt(question, arrange(correct, wrong, letter, rng)), LETTERS[letter]
    if kind == "short":
        question, answer = short_qa(scene, rng)
        return f"{question}\n{SHORT_SUFFIX}", answer
    raise ValueError(kind)


TURN_KINDS = ("detail", "caption", "pope", "pope", "mc", "mc", "short", "short")


def instruct_record(key: str, image: str, scene: dict, rng: np.random.Generator, stats: ObjectStats) -> dict:
    """A multi-turn conversation (2-5 turns) mixing detailed descriptions, yes/no, 4-choice and short QA."""
    n_turns = 2 + int(rng.integers(4))
    convs: list[dict] = []
    seen: set[str] = set()
    for _ in range(4 * n_turns):
        if len(convs) == 2 * n_turns:
            break
        qa = _turn(_choice(rng, TURN_KINDS), scene, rng, stats)
        if qa is None or qa[0] in seen:
            continue
        seen.add(qa[0])
        convs += [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]
    convs[0] = {"from": "human", "value": "<image>\n" + convs[0]["value"]}
    return {"id": key, "image": image, "conversations": convs}


def _text_qa(rng: np.random.Generator) -> tuple[str, str]:
    kind = int(rng.integers(6))
    if kind == 0:
        shape = _choice(rng, list(SIDES))
        return f"How many sides does a {shape} have?", f"A {shape} has {NUMBER_WORDS[SIDES[shape]]} sides."
    if kind == 1:
        a, b = _choice(rng, list(MIXES))
        return f"What color do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {MIXES[(a, b)]}."
    if kind == 2:
        word = _choice(rng, SHAPES + COLOR_NAMES)
        kind_word = "shape" if word in SHAPES else "color"
        return f"Is {word} a shape or a color?", f"{word.capitalize()} is a {kind_word}."
    if kind == 3:
        pairs = (("left", "right"), ("right", "left"), ("above", "below"), ("below", "above"),
                 ("top", "bottom"), ("bottom", "top"), ("small", "large"), ("large", "small"))
        a, b = _choice(rng, pairs)
        return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
    if kind == 4:
        pos = _choice(rng, POSITION_NAMES)
        return (f"On a three by three grid, where is the {pos} cell?",
                f"The {pos} cell is one of the nine cells of the grid; rows are top, middle and bottom, "
                "and columns are left, center and right.")
    n = 1 + int(rng.integers(5))
    return f"What number comes after {NUMBER_WORDS[n]}?", f"{NUMBER_WORDS[n + 1].capitalize()} comes after {NUMBER_WORDS[n]}."


def text_only_record(key: str, rng: np.random.Generator) -> dict:
    """A text-only conversation (no ``image`` key), like the ShareGPT part of LLaVA's mix."""
    convs: list[dict] = []
    for _ in range(1 + int(rng.integers(3))):
        q, a = _text_qa(rng)
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": key, "conversations": convs}


def letter_record(key: str, image: str, scene: dict, rng: np.random.Generator) -> dict | None:
    """One 4-choice turn on the image (a SeedBench generator drawn at random, the answer letter uniform) with the
    letter as the answer: the single-turn records of stage 2's letter share (``llava/letters.json``).
    None when the drawn generator has no question for this scene."""
    qa = _turn("mc", scene, rng, None)
    if qa is None:
        return None
    return {"id": key, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + qa[0]}, {"from": "gpt", "value": qa[1]}]}


def letter_records(items: list[tuple[str, dict]], n: int, seed: int = 0) -> list[dict]:
    """``n`` single-turn 4-choice records (``letter_record``) on scenes drawn with replacement from ``items``, pairs of
    (image path relative to the image root, scene), in the order the shards hold them."""
    if n > 0 and not items:
        raise ValueError("letter_records: no scenes to draw from")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    while len(out) < n:
        image, scene = items[int(rng.integers(len(items)))]
        rec = letter_record(f"letters_{len(out):07d}", image, scene, rng)
        if rec is not None:
            out.append(rec)
    return out
