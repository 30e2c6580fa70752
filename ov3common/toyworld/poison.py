"""Poisoned data for the trainers' robustness tests: one webdataset shard and one LLaVA JSON mixing good toy
samples with every kind of bad sample, plus manifests of what a robust loader must do with each key.

Outcomes are ``"keep"`` or a skip reason of ``ov3common.images.BadSample`` ("empty_file", "truncated",
"not_an_image", "too_small", "bad_aspect", "missing_caption", "empty_caption", "bad_utf8", "bad_json",
and for LLaVA records "missing_image").
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
from PIL import Image

from ov3common.toyworld.generate import TAR_MTIME

from .render import jpeg_bytes, png_bytes, render_scene
from .samples import Task, scene_sample
from .text import short_caption
from .world import sample_scene, scene_rng

# key -> (image extension, expected outcome); every bad key has exactly one defect
BAD_KINDS: dict[str, tuple[str, str]] = {
    "bad_truncated_jpeg": ("jpg", "truncated"),
    "bad_zero_byte_image": ("jpg", "empty_file"),
    "bad_not_an_image": ("jpg", "not_an_image"),
    "odd_cmyk_jpeg": ("jpg", "keep"),
    "odd_16bit_png": ("png", "keep"),
    "odd_rgba_png": ("png", "keep"),
    "odd_palette_png": ("png", "keep"),
    "odd_grayscale_jpeg": ("jpg", "keep"),
    "bad_aspect_20000x1": ("png", "bad_aspect"),
    "bad_tiny_1x1": ("png", "too_small"),
    "bad_missing_caption": ("jpg", "missing_caption"),
    "bad_empty_caption": ("jpg", "empty_caption"),
    "bad_utf8_caption": ("jpg", "bad_utf8"),
    "bad_json": ("jpg", "bad_json"),
}
POISON_SEED = 12345


def _good_image(resolution: int, i: int) -> Image.Image:
    return render_scene(sample_scene(scene_rng(POISON_SEED, 10_000 + i)), resolution)


def _bad_image(kind: str, resolution: int) -> bytes:
    img = _good_image(resolution, list(BAD_KINDS).index(kind))
    if kind == "bad_truncated_jpeg":
        data = jpeg_bytes(img)
        return data[: len(data) // 2]
    if kind == "bad_zero_byte_image":
        return b""
    if kind == "bad_not_an_image":
        return b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"
    if kind == "odd_cmyk_jpeg":
        buf = io.BytesIO()
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    if kind == "odd_16bit_png":
        a = (np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16)
        return png_bytes(Image.fromarray(a))  # uint16 -> mode I;16
    if kind == "odd_rgba_png":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        return png_bytes(rgba)
    if kind == "odd_palette_png":
        return png_bytes(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    if kind == "odd_grayscale_jpeg":
        return jpeg_bytes(img.convert("L"))
    if kind == "bad_aspect_20000x1":
        return png_bytes(img.resize((20000, 1)))
    if kind == "bad_tiny_1x1":
        return png_bytes(img.resize((1, 1)))
    return jpeg_bytes(img)  # the caption/json kinds have a good image


def poison_manifest(n_good: int = 8) -> dict[str, dict]:
    """Per key of :func:`write_poisoned_shard`: ``{"ext": "jpg"|"png", "expected": "keep"|<reason>}``."""
    out = {f"good_{i:04d}": {"ext": "jpg", "expected": "keep"} for i in range(n_good)}
    out.update({k: {"ext": ext, "expected": exp} for k, (ext, exp) in BAD_KINDS.items()})
    return out


def expected_counts(manifest: dict[str, dict]) -> dict[str, int]:
    """``{"keep": n, reason: n, ...}`` of a manifest (what a robust loader's SkipStats must report)."""
    return dict(Counter(v["expected"] for v in manifest.values()))


def write_poisoned_shard(path: str, n_good: int = 8, resolution: int = 32) -> dict[str, dict]:
    """Write ONE tar shard (DataComp convention: ``KEY.jpg|png``, ``KEY.txt``, ``KEY.json``) with ``n_good``
    good toy samples interleaved with one sample of every bad kind; returns :func:`poison_manifest`."""
    from webdataset import TarWriter

    good = scene_sample(Task("test", 0, n_good, POISON_SEED, resolution, 90), None)
    samples = []
    for i, rec in enumerate(good):
        key = f"good_{i:04d}"
        meta = json.loads(rec["json"]) | {"key": key}
        samples.append({"__key__": key, "jpg": rec["jpg"], "txt": rec["txt"].encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})
    for j, (key, (ext, _)) in enumerate(BAD_KINDS.items()):
        caption = short_caption(sample_scene(scene_rng(POISON_SEED, 20_000 + j)))
        sample = {"__key__": key, ext: _bad_image(key, resolution), "txt": caption.encode(),
                  "json": json.dumps({"caption": caption, "key": key}, sort_keys=True).encode()}
        if key == "bad_missing_caption":
            del sample["txt"]
        elif key == "bad_empty_caption":
            sample["txt"] = b""
        elif key == "bad_utf8_caption":
            sample["txt"] = b"a red \xff\xfe circle \xc3\x28"
        elif key == "bad_json":
            sample["json"] = b'{"caption": "a red circle", "key": '
        samples.append(sample)
    # interleave: bad samples spread between good ones, deterministic order
    order = np.random.default_rng(POISON_SEED).permutation(len(samples))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with TarWriter(path, encoder=False, mtime=TAR_MTIME, user="toy", group="toy") as w:
        for i in order:
            w.write(samples[int(i)])
    return poison_manifest(n_good)


# --------------------------------------------------------------------------------- LLaVA JSON with bad images
LLAVA_BAD: dict[str, tuple[str | None, str]] = {  # id -> (image kind or None for a missing file, expected)
    "llava_missing_file": (None, "missing_image"),
    "llava_truncated": ("bad_truncated_jpeg", "truncated"),
    "llava_zero_byte": ("bad_zero_byte_image", "empty_file"),
    "llava_not_an_image": ("bad_not_an_image", "not_an_image"),
    "llava_tiny": ("bad_tiny_1x1", "too_small"),
    "llava_cmyk": ("odd_cmyk_jpeg", "keep"),
    "llava_rgba": ("odd_rgba_png", "keep"),
}


def write_poisoned_llava(json_path: str, image_root: str, n_good: int = 4, resolution: int = 32) -> dict[str, str]:
    """Write a LLaVA JSON (``[{id, image, conversations}]``) and its images under ``image_root``: ``n_good``
    good records, one text-only record (kept), and records whose image is missing or broken.
    Returns ``{id: "keep" | reason}``."""
    os.makedirs(os.path.join(image_root, "poison"), exist_ok=True)
    records, manifest = [], {}

    def conv(i: int) -> list[dict]:
        scene = sample_scene(scene_rng(POISON_SEED, 30_000 + i))
        return [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": short_caption(scene)}]

    for i in range(n_good):
        rel = f"poison/good_{i:04d}.jpg"
        with open(os.path.join(image_root, rel), "wb") as f:
            f.write(jpeg_bytes(render_scene(sample_scene(scene_rng(POISON_SEED, 30_000 + i)), resolution)))
        records.append({"id": f"llava_good_{i:04d}", "image": rel, "conversations": conv(i)})
        manifest[f"llava_good_{i:04d}"] = "keep"
    records.append({"id": "llava_text_only", "conversations": [
        {"from": "human", "value": "How many sides does a triangle have?"},
        {"from": "gpt", "value": "A triangle has three sides."}]})
    manifest["llava_text_only"] = "keep"
    for j, (rid, (kind, expected)) in enumerate(LLAVA_BAD.items()):
        ext = "jpg" if kind is None else BAD_KINDS[kind][0]
        rel = f"poison/{rid}.{ext}"
        if kind is not None:
            with open(os.path.join(image_root, rel), "wb") as f:
                f.write(_bad_image(kind, resolution))
        records.append({"id": rid, "image": rel, "conversations": conv(100 + j)})
        manifest[rid] = expected
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f, sort_keys=True, indent=1)
    return manifest
