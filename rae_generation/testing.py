"""Tiny synthetic data for tests and smoke runs (no toy world needed): a class-labelled ImageFolder of coloured
shapes, and poisoned variants (an ImageFolder and a webdataset shard) holding every kind of bad image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(220, 30, 35), (35, 85, 220), (35, 155, 55), (235, 195, 0), (135, 55, 185), (25, 25, 25)]


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def shape_image(cls: int, i: int, size: int = 32) -> Image.Image:
    """Class ``cls``: a colour (cls % 6) and a shape (square or disc, cls // 6 % 2) at a position that varies with i."""
    rng = np.random.default_rng([cls, i])
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    r = size // 5
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    colour = COLOURS[cls % len(COLOURS)]
    (d.rectangle if (cls // len(COLOURS)) % 2 == 0 else d.ellipse)(box, fill=colour)
    return img


def make_image_folder(root: str | Path, num_classes: int = 4, per_class: int = 8, size: int = 32) -> Path:
    root = Path(root)
    for c in range(num_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(c, i, size).save(d / f"{i:04d}.png")
    return root


def bad_images(size: int = 32) -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected skip reason or None when it must be converted and kept)."""
    base = shape_image(0, 0, size)
    a16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "truncated.jpg": (_jpeg(base)[:200], "truncated"),
        "zero.png": (b"", "empty_file"),
        "text.png": (b"this is not an image at all" * 10, "not_an_image"),
        "long.png": (_png(Image.new("RGB", (20000, 1))), "bad_aspect"),
        "one.png": (_png(Image.new("RGB", (1, 1))), "too_small"),
        "cmyk.jpg": (_jpeg(base.convert("CMYK")), None),
        "gray16.png": (_png(Image.fromarray(a16)), None),
        "rgba.png": (_png(base.convert("RGBA")), None),
        "palette.png": (_png(base.convert("P")), None),
        "gray.png": (_png(base.convert("L")), None),
    }


def make_poisoned_folder(root: str | Path, size: int = 32, good_per_class: int = 4) -> tuple[Path, dict]:
    """An ImageFolder with 2 good classes plus every bad image in class_00; returns (root, expected skip counts)."""
    root = make_image_folder(root, 2, good_per_class, size)
    expected: dict[str, int] = {}
    for name, (data, reason) in bad_images(size).items():
        (root / "class_00" / f"bad_{name}").write_bytes(data)
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    return root, expected


def make_poisoned_shard(path: str | Path, size: int = 32, good: int = 6) -> tuple[Path, dict]:
    """A webdataset shard: good samples (``jpg`` + ``json`` with label/class_name), every bad image, plus missing /
    invalid JSON, invalid UTF-8 and unlabelled samples, then a truncated tail. Returns (path, expected skips)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    expected: dict[str, int] = {}

    def meta(label, name="class_00", caption="a shape"):
        return json.dumps({"label": label, "class_name": name, "caption": caption}).encode()

    for i in range(good):
        members += [(f"good{i:03d}.png", _png(shape_image(i % 2, i, size))),
                    (f"good{i:03d}.json", meta(i % 2, f"class_{i % 2:02d}"))]
    for j, (name, (data, reason)) in enumerate(bad_images(size).items()):
        ext = name.split(".")[1]
        members += [(f"bad{j:03d}.{ext}", data), (f"bad{j:03d}.json", meta(0))]
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    img = _png(shape_image(1, 99, size))
    members += [("nojson.png", img)]                                           # missing json -> bad_json
    members += [("badjson.png", img), ("badjson.json", b"{not json")]          # invalid json
    members += [("badutf.png", img), ("badutf.json", b"\xff\xfe{\"label\": 1}")]  # invalid UTF-8
    members += [("nolabel.png", img), ("nolabel.json", meta(None))]            # a multi-object scene: no class
    members += [("noimage.json", meta(1, "class_01"))]                         # json without an image
    expected["bad_json"] = expected.get("bad_json", 0) + 3
    expected["no_label"] = 1
    expected["missing_image"] = 1
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, expected
