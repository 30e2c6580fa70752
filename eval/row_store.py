"""Rows of ``make eval-all`` kept between runs: ``eval-all only=[row]`` stores a row's results in
``<out>/<slug>/row.json`` with a fingerprint of what they depend on; a later full run takes the row from there while
the fingerprint still matches (settings, the row's run folders and benchmark files, the evaluation code)."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from eval.eval_config import RowConfig
from ov3common.checkpoint import atomic_write_json
from ov3common.config import to_dict

ROW_FORMAT = 1
CODE_PACKAGES = ("eval", "encoder", "rae_generation", "llava_bridge", "ov3common")


def _listing(paths: list[str]) -> list:
    """(path, size, mtime_ns) of every file under ``paths`` (files or folders; absent ones listed as absent)."""
    out: list = []
    for p in sorted(set(filter(None, paths))):
        root = Path(p)
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            try:
                st = f.stat()  # one stat per file: size, mtime and kind
            except FileNotFoundError:
                out.append((str(f), None, None))
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((str(f), st.st_size, st.st_mtime_ns))
    return out


def row_fingerprint(cfg, row: RowConfig) -> str:
    """What a row's results depend on: the settings (all but the output and row selection), the row's run folders
    and the benchmark files (path, size, mtime of every file) and the evaluation code (sha256 of the packages' .py)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "rows", "only", "reuse_rows")}
    inputs = [row.encoder, row.encoder_run, row.llava, row.rae, cfg.pope.path, cfg.seedbench.path, cfg.rfid.images,
              cfg.gfid.real, cfg.fid.weights, cfg.toygen.classifier]
    repo = Path(__file__).resolve().parents[1]  # the checkout whose code evaluates
    code = hashlib.sha256()
    for f in sorted(f for pkg in CODE_PACKAGES for f in (repo / pkg).rglob("*.py")):
        code.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes())
    blob = json.dumps({"format": ROW_FORMAT, "settings": settings, "row": to_dict(row), "files": _listing(inputs),
                       "code": code.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reusable_row(path: Path, cfg, row: RowConfig) -> dict | None:
    """A stored row (``only=[...]`` run) whose fingerprint matches the present inputs, settings and code; else None."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stored if stored.get("fingerprint") == row_fingerprint(cfg, row) else None


def store_row(path: Path, cfg, row: RowConfig, entry: dict, identity: dict) -> None:
    """Write a row's results (and the benchmark identities they were scored on) with their fingerprint."""
    atomic_write_json(path, {"fingerprint": row_fingerprint(cfg, row), "entry": entry, "identity": identity})
