"""Index webdataset tar shards (``KEY.jpg`` + ``KEY.txt`` / ``KEY.json``) as random-access LLaVA ``plain`` records.

Captions are decoded while indexing (small); image bytes are read lazily from their offset in the tar. Bad
captions (missing, empty, invalid UTF-8, invalid JSON) and keys without an image are counted in ``SkipStats``;
a truncated or corrupt tar keeps the members read before the damage and counts ``bad_shard``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ov3common.images import BadSample, SkipStats, decode_json, decode_text
from ov3common.log import get_logger
from ov3common.shards import index_tar, read_member

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class TarImage:
    path: str
    offset: int
    size: int


def _scan(path: Path, stats: SkipStats) -> dict[str, dict]:
    """Key -> {"image": TarImage, "txt"/"json": bytes} through the project's tar reader (``ov3common.shards``)."""
    fields: dict[str, dict] = {}

    def damaged(reason: str, url: str, detail: str) -> None:
        stats.add("bad_shard")
        get_logger(__name__).warning("%s: unreadable after %d keys (%s: %s); keeping what was read", url,
                                     len(fields), reason, detail)

    handles: dict = {}
    try:
        for key, members in index_tar(str(path), on_error=damaged):
            entry = fields.setdefault(key, {})
            for ext, (offset, size) in members.items():
                if ext in IMAGE_EXTS:
                    entry["image"] = TarImage(str(path), offset, size)
                elif ext in ("txt", "json") and size <= MAX_TEXT_BYTES:
                    entry[ext] = read_member(str(path), offset, size, handles)
    finally:
        for f in handles.values():
            f.close()
    return fields


def _caption(entry: dict, field: str) -> str:
    """The caption; a sample whose metadata JSON is present but invalid is skipped too (``bad_json``)."""
    obj = decode_json(entry["json"]) if "json" in entry or field.startswith("json.") else {}
    if field == "txt":
        return decode_text(entry.get("txt"), "caption")
    if field.startswith("json."):
        return decode_text(obj.get(field[5:]), "caption")
    raise ValueError(f"shard_caption must be 'txt' or 'json.<field>', got {field!r}")


def index_shards(paths, stats: SkipStats, caption_field: str = "txt") -> list[dict]:
    """``[{id, image: TarImage, conversations}]`` for every usable key of the shards (``plain`` pretraining)."""
    out = []
    for path in paths:
        for key, entry in _scan(Path(path), stats).items():
            if "image" not in entry:
                stats.add("missing_image")
                continue
            try:
                caption = _caption(entry, caption_field)
            except BadSample as e:
                stats.add(e.reason)
                continue
            out.append({"id": f"{Path(path).name}/{key}", "image": entry["image"], "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]})
    return out


def read_tar_member(img: TarImage) -> bytes:
    """The member's bytes (short if the tar was truncated: the decoder then reports ``truncated``)."""
    try:
        return read_member(img.path, img.offset, img.size)
    except FileNotFoundError as e:
        raise BadSample("missing_image", img.path) from e
