"""Anti-aliased rendering of a scene graph with PIL (draw at k x the resolution, then box-downsample)."""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLORS

JPEG_QUALITY = 92


def _regular(n: int, r: float, phase: float) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 0.5 if k % 2 == 0 else 0.21
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a) + 0.04))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 34.0, -y / 34.0 + 0.03))
    return pts


_W = 0.17  # half arm width of the cross
# unit polygons inside [-0.5, 0.5]^2 (y down); the circle is drawn as an ellipse
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)],
    "triangle": [(0.0, -0.5), (0.5, 0.4), (-0.5, 0.4)],
    "star": _star(),
    "heart": _heart(),
    "diamond": [(0.0, -0.5), (0.36, 0.0), (0.0, 0.5), (-0.36, 0.0)],
    "hexagon": _regular(6, 0.5, 0.0),
    "cross": [(-_W, -0.5), (_W, -0.5), (_W, -_W), (0.5, -_W), (0.5, _W), (_W, _W), (_W, 0.5), (-_W, 0.5),
              (-_W, _W), (-0.5, _W), (-0.5, -_W), (-_W, -_W)],
}


def supersample_factor(resolution: int) -> int:
    return 4 if resolution <= 128 else 2


@lru_cache(maxsize=32)
def _background(name: str, size: int) -> Image.Image:
    top, bottom = (np.asarray(c, np.float32) for c in BACKGROUNDS[name])
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    rows = np.rint(top[None] * (1 - t) + bottom[None] * t).astype(np.uint8)  # [size, 3]
    arr = np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (size, size, 3)))
    return Image.fromarray(arr, "RGB")


def render_scene(scene: dict, resolution: int = 64) -> Image.Image:
    """The RGB image of a scene graph at ``resolution`` x ``resolution`` pixels."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    k = supersample_factor(resolution)
    size = resolution * k
    canvas = _background(scene["background"], size).copy()
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = (v * size for v in obj["bbox"])
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
            continue
        cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
        draw.polygon([(cx + px * w, cy + py * w) for px, py in POLYGONS[obj["shape"]]], fill=fill)
    return canvas.reduce(k)


def jpeg_bytes(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Deterministic JPEG (fixed quality, no EXIF, no progressive, 4:4:4 so small colour shapes survive)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG (Pillow writes no timestamp chunk unless asked)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
