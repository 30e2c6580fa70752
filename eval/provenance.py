"""Which benchmark file was read: sha256, row counts, and the known variant it matches (else a loud warning).

:func:`identify` is called for every POPE / SEED-Bench / reference-statistics input that :mod:`eval.eval_all` reads;
its dict goes into the report and the row's manifest. A file (or a folder: every data file in it, hashed in
sorted order) gets ``sha256``, ``rows`` (questions, after no filtering), ``per_category`` and ``variant``, or
``warning`` when its counts match no known variant.

Known variants (row counts per category; sources checked for this table):
  * POPE, lmms-lab/POPE (the ``test`` split lmms-eval reads): 9,000 rows, 3,000 each of adversarial / popular /
    random (the dataset card, evalscope's statistics of lmms-lab/POPE). lmms-eval reports one number pooled over
    all rows.
  * POPE, LLaVA-1.5's files: ``docs/Evaluation.md`` pins AoiDragon/POPE at commit e3e39262 whose
    ``output/coco/coco_pope_random.json`` has 2,910 lines (popular and adversarial 3,000): 8,910 questions.
    LLaVA's ``eval_pope.py`` scores each category; its reported POPE is the mean F1 of the three. (POPE's current
    files, commit edebdda, have 3,000 random questions again.)
  * The toy world's own files: counts recorded in the toy world's ``meta.json`` (``counts.pope``,
    ``counts.seedbench``) next to the file.
SEED-Bench: no row counts could be verified offline for this table (the SEED-Bench-1 README says "19K" questions,
image and video together), so every real SEED-Bench file is reported with its hash and counts and the warning
that its variant is unknown; add the variant here, with its source, once checked.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ov3common.checkpoint import sha256_file

DATA_EXTS = (".jsonl", ".json", ".parquet", ".arrow", ".npz")

KNOWN_VARIANTS: dict[str, list[dict]] = {
    "pope": [
        {"name": "lmms-lab/POPE test (3,000 per category; lmms-eval pools all 9,000)",
         "per_category": {"adversarial": 3000, "popular": 3000, "random": 3000},
         "source": "huggingface.co/datasets/lmms-lab/POPE (9k rows); AoiDragon/POPE@edebdda output/coco"},
        {"name": "LLaVA-1.5 llava_pope_test (random 2,910; LLaVA reports the mean F1 of the 3 categories)",
         "per_category": {"adversarial": 3000, "popular": 3000, "random": 2910},
         "source": "haotian-liu/LLaVA docs/Evaluation.md -> AoiDragon/POPE@e3e39262 output/coco"},
    ],
    "seedbench": [],
}


def sha256_path(path: str | Path, exts: tuple[str, ...] = DATA_EXTS) -> tuple[str, list[str]]:
    """sha256 of a file, or of a folder's data files (relative name + content hash, sorted); and the files."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p), [p.name]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest(), [f.relative_to(p).as_posix() for f in files]


def _toy_counts(path: Path) -> dict | None:
    for d in (path.parent, path.parent.parent, path.parent.parent.parent):
        meta = d / "meta.json"
        if meta.is_file():
            try:
                m = json.loads(meta.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return None
            if "generator_version" in m:
                return {"version": m["generator_version"], **m.get("counts", {})}
    return None


def identify(kind: str, path: str | Path, records: list[dict]) -> dict:
    """Identity of a benchmark file read as ``records`` (all rows, before any limit): hash, counts, variant."""
    if kind not in KNOWN_VARIANTS:
        raise ValueError(f"kind: one of {sorted(KNOWN_VARIANTS)}, got {kind!r}")
    digest, files = sha256_path(path)
    per_cat = dict(sorted(Counter(str(r.get("category", "")) for r in records).items()))
    out: dict = {"kind": kind, "path": str(path), "sha256": digest, "files": files[:20], "rows": len(records),
                 "per_category": per_cat}
    if kind == "seedbench":
        out["per_data_type"] = dict(sorted(Counter(str(r.get("data_type") or "image") for r in records).items()))
    toy = _toy_counts(Path(path))
    if toy is not None and toy.get(kind) == len(records):
        out["variant"] = f"toy world {toy['version']} ({len(records)} rows, as its meta.json records)"
        return out
    for v in KNOWN_VARIANTS[kind]:
        if v["per_category"] == per_cat:
            out["variant"], out["variant_source"] = v["name"], v["source"]
            return out
    known = "; ".join(f"{v['name']}: {v['per_category']}" for v in KNOWN_VARIANTS[kind]) or "none verified"
    out["variant"] = None
    out["warning"] = (f"UNKNOWN {kind} VARIANT: {len(records)} rows {per_cat} match no known variant "
                      f"(known: {known}); scores are not comparable to published ones until it is identified")
    return out


def identify_reference(path: str | Path) -> dict:
    """Identity of a reference-statistics input (an ADM npz or an image folder): sha256 and image count."""

    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            n = int(z["arr_0"].shape[0]) if "arr_0" in z.files else None
            keys = sorted(z.files)
        return {"kind": "reference", "path": str(p), "sha256": sha256_file(p), "rows": n, "keys": keys}
    digest, files = sha256_path(p, (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    return {"kind": "reference", "path": str(p), "sha256": digest, "rows": len(files)}
