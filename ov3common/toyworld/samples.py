"""Per-sample work (run in worker processes): every output of one index is a pure function of its inputs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .llava import instruct_record, pretrain_record
from .questions import ObjectStats
from .render import jpeg_bytes, png_bytes, render_scene
from .text import alt_text, recaption, short_caption
from .world import CLASSES, OBJECTS, class_label, sample_scene, scene_rng, single_object_scene, split_seed


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def image_relpath(split: str, index: int) -> str:
    """Path of an image relative to the LLaVA image root ``<out>/images``."""
    return f"{split}/{sample_key(split, index)}.jpg"


def dumps(obj) -> str:
    """Canonical JSON (sorted keys, no spaces) so files are byte-identical across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Task:
    """A contiguous range of indices of one split (scene splits) or of one class (class splits)."""

    split: str
    start: int
    stop: int
    seed: int
    resolution: int
    jpeg_quality: int
    class_index: int = -1
    out: str = ""  # when set, the worker writes image files (images/<split>/KEY.jpg, classes/...) under it


def scenes_for(split: str, seed: int, start: int, stop: int) -> list[dict]:
    sseed = split_seed(seed, split)
    return [sample_scene(scene_rng(sseed, i)) for i in range(start, stop)]


def scene_sample(task: Task, stats: ObjectStats | None) -> list[dict]:
    """Render and describe the scenes of ``task``; train samples also get their LLaVA records."""
    sseed = split_seed(task.seed, task.split)
    out = []
    for i in range(task.start, task.stop):
        scene = sample_scene(scene_rng(sseed, i))
        text_rng = scene_rng(sseed, i, 1)
        key = sample_key(task.split, i)
        label = class_label(scene)
        caption = alt_text(scene, text_rng)
        meta = {"key": key, "caption": caption, "recaption": recaption(scene, text_rng),
                "short_caption": short_caption(scene), "scene": scene, "label": label,
                "class_name": None if label is None else CLASSES[label], "split": task.split, "index": i,
                "width": task.resolution, "height": task.resolution}
        rec = {"key": key, "recaption": meta["recaption"], "jpg": jpeg_bytes(render_scene(scene, task.resolution), task.jpeg_quality),
               "txt": caption, "json": dumps(meta), "scene": scene}
        if task.split == "train":
            qa_rng = scene_rng(sseed, i, 2)
            rec["pretrain"] = pretrain_record(key, image_relpath(task.split, i), scene, qa_rng)
            if stats is not None:
                rec["instruct"] = instruct_record(key, image_relpath(task.split, i), scene, qa_rng, stats)
        out.append(rec)
    return out


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def class_sample(task: Task) -> list[tuple[str, bytes]]:
    """``(relative path, PNG bytes)`` for images ``start..stop`` of one class of a class split."""
    sseed = split_seed(task.seed, task.split)
    name = OBJECTS[task.class_index]
    cls = CLASSES[task.class_index]
    sub = task.split.removeprefix("classes_")
    out = []
    for i in range(task.start, task.stop):
        rng = np.random.default_rng([sseed, task.class_index, i])
        img = render_scene(single_object_scene(rng, name), task.resolution)
        out.append((f"classes/{sub}/{cls}/{sub}_{cls}_{i:05d}.png", png_bytes(img)))
    return out


def run_task(task: Task, stats: ObjectStats | None = None) -> tuple[Task, list]:
    """Run one task in a worker. With ``task.out`` set, image files are written here (in parallel) and only
    what the parent still writes (shard members, texts, scenes) is sent back."""
    if task.class_index >= 0:
        result = class_sample(task)
        if not task.out:
            return task, result
        os.makedirs(os.path.join(task.out, os.path.dirname(result[0][0])), exist_ok=True)
        for rel, data in result:
            _write_file(os.path.join(task.out, rel), data)
        return task, [rel for rel, _ in result]
    result = scene_sample(task, stats)
    if task.out:
        for rec in result:
            _write_file(os.path.join(task.out, "images", task.split, rec["key"] + ".jpg"), rec["jpg"])
    return task, result
