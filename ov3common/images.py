"""Robust decoding of web data (nothing crashes on bad input), image transforms and PNG grids.

``decode_image`` returns an RGB image or raises :class:`BadSample` with a short reason. Decodable odd modes (CMYK,
16-bit, RGBA, palette, grayscale, 1-bit) are converted to RGB and kept; the rest is skipped and counted in
:class:`SkipStats`, which trainers log once per epoch.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torchvision.utils import make_grid

from ov3common.checkpoint import atomic_write
from ov3common.dist import get_world_size

__all__ = [
    "BadSample",
    "decode_image",
    "decode_text",
    "decode_json",
    "SkipStats",
    "center_crop_resize",
    "pad_to_square",
    "to_tensor_pm1",
    "to_uint8",
    "save_image_grid",
]

SKIP_REASONS = (
    "empty_file", "truncated", "not_an_image", "too_small", "too_large", "bad_aspect",
    "missing_caption", "empty_caption", "bad_utf8", "bad_json", "missing_image",
)


class BadSample(Exception):
    """A sample to skip; ``reason`` is a short machine-readable tag (see ``SKIP_REASONS``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB. Returns (image, name of the conversion or None)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), "16bit"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img, "palette"
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale"
    return img.convert("RGB"), mode.lower()


def decode_image(data: bytes | None, min_side: int = 8, max_aspect: float = 10.0,
                 stats: SkipStats | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, or raise :class:`BadSample`."""
    if data is None:
        raise BadSample("missing_image")
    if len(data) == 0:
        raise BadSample("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max(w, h) > max_aspect * max(min(w, h), 1):
                raise BadSample("bad_aspect", f"{w}x{h}")
            if min(w, h) < min_side:
                raise BadSample("too_small", f"{w}x{h}")
            img.load()
    except BadSample:
        raise
    except UnidentifiedImageError as e:
        raise BadSample("not_an_image", str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadSample("truncated", str(e)) from e
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, TypeError):
        pass  # a broken EXIF block only loses the orientation, never the sample
    img, conversion = _to_rgb(img)
    if conversion and stats is not None:
        stats.converted[conversion] += 1
    return img


def decode_text(data: bytes | str | None, field: str = "caption") -> str:
    """UTF-8 text, stripped; raises BadSample('missing_<field>' | 'bad_utf8' | 'empty_<field>')."""
    if data is None:
        raise BadSample(f"missing_{field}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", f"{field}: {e}") from e
    text = data.strip()
    if not text:
        raise BadSample(f"empty_{field}")
    return text


def decode_json(data: bytes | str | None) -> dict:
    """A JSON object; raises BadSample('bad_json') for anything else (absent, invalid UTF-8, invalid JSON, not a dict)."""
    if data is None:
        raise BadSample("bad_json", "absent")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", str(e)) from e
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f"top level is {type(obj).__name__}, not an object")
    return obj


class SkipStats:
    """Counts of skipped samples per reason, and of kept samples converted from an odd mode."""

    def __init__(self):
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()

    def reset(self) -> None:
        """Zero every count (a new epoch)."""
        self.skipped.clear()
        self.converted.clear()

    def add(self, reason: str) -> None:
        self.skipped[reason] += 1

    def update(self, other: SkipStats) -> None:
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)

    def total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"skipped": dict(sorted(self.skipped.items())), "converted": dict(sorted(self.converted.items())),
                "skipped_total": self.total()}

    def reduce(self) -> SkipStats:
        """Sum over ranks (a collective under torchrun)."""

        out = SkipStats()
        if get_world_size() == 1:
            out.update(self)
            return out

        parts: list = [None] * get_world_size()
        dist.all_gather_object(parts, (dict(self.skipped), dict(self.converted)))
        for s, c in parts:
            out.skipped.update(s)
            out.converted.update(c)
        return out

    def log(self, logger, epoch: int | str) -> None:
        d = self.as_dict()
        logger.info("epoch %s: skipped %d bad samples %s; converted to RGB %s", epoch, d["skipped_total"],
                    d["skipped"], d["converted"])

    def state_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "converted": dict(self.converted)}

    def load_state_dict(self, d: dict) -> None:
        self.skipped, self.converted = Counter(d.get("skipped", {})), Counter(d.get("converted", {}))


# ------------------------------------------------------------------------------------------------ transforms
def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and crop the centre square."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if s < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Pad to a square, image centred (LLaVA's expand2square). ``fill=None`` uses the image's mean colour."""
    w, h = img.size
    if w == h:
        return img
    if fill is None:
        fill = tuple(int(round(v)) for v in np.asarray(img).reshape(-1, 3).mean(0))
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def to_tensor_pm1(img: Image.Image) -> torch.Tensor:
    """RGB PIL → float tensor [3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return a.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (B, 3, H, W) → uint8 NHWC numpy (the ADM npz layout)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: float) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8,
                    labels: list[str] | None = None, pad: int = 2, row_labels: list[str] | None = None,
                    min_tile: int = 96) -> None:
    """Save a PNG grid of images in [-1, 1]; optional text under each tile (``labels``) and at the left of each
    row (``row_labels``). Tiles smaller than ``min_tile`` px are enlarged (nearest neighbour) so they read."""
    images = images.detach().float().cpu()
    n, _, h, w = images.shape
    if min(h, w) < min_tile:
        f = -(-min_tile // min(h, w))
        images = torch.nn.functional.interpolate(images, scale_factor=f, mode="nearest")
        h, w = h * f, w * f
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = make_grid((images + 1) / 2, nrow=nrow, padding=pad, pad_value=1.0).clamp(0, 1)
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    canvas = Image.fromarray(arr)
    if labels or row_labels:
        font = _font(max(11, min(18, w // 7)))
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        line_h = int(font.size * 1.3) + 2 if labels and hasattr(font, "size") else (13 if labels else 0)
        left = (int(max(measure.textlength(str(t), font=font) for t in row_labels[:rows])) + 10
                if row_labels else 0)
        left = min(left, 3 * w)
        out = Image.new("RGB", (left + canvas.width, canvas.height + rows * line_h), "white")
        draw = ImageDraw.Draw(out)
        for r in range(rows):
            y0 = r * (h + pad + line_h)
            out.paste(canvas.crop((0, r * (h + pad), canvas.width, (r + 1) * (h + pad) + pad)), (left, y0))
            if row_labels and r < len(row_labels):
                draw.text((4, y0 + pad + h // 2), _fit(draw, str(row_labels[r]), font, left - 8), fill=(0, 0, 0),
                          font=font, anchor="lm")
            for c in range(nrow):
                i = r * nrow + c
                if labels and i < n and i < len(labels):
                    draw.text((left + c * (w + pad) + pad, y0 + h + pad + 1), _fit(draw, str(labels[i]), font, w),
                              fill=(0, 0, 0), font=font)
        canvas = out
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: canvas.save(p, format="PNG"))
