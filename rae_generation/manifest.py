"""Sampling manifests: what produced a samples npz, written beside it as ``<stem>.manifest.json``.

Written by ``rae_generation.sample`` (``make rae-sample``) and :mod:`eval.gfid`; read by :mod:`eval.eval_all`, which
scores a samples file only when its manifest matches the protocol the config asks for, and refuses to put two rows
side by side whose manifests differ in a protocol field (unless ``compare.allow_protocol_mismatch=true``).

Fields (``PROTOCOL_FIELDS`` must match between compared rows; the rest identify the run):
  * ``checkpoint`` / ``checkpoint_sha256`` — the weights file sampled (``ema.safetensors`` or ``model.safetensors``)
    and its sha256 (from the checkpoint's own ``state.json`` manifest when present);
  * ``weights`` — ``ema`` | ``model`` (raw);
  * ``sampler`` (ODE method), ``steps``, ``cfg_scale``, ``cfg_interval`` (guidance only for t in it);
  * ``guidance`` — ``none`` (scale 1), ``cfg`` or ``autoguidance``, and ``guide_checkpoint_sha256`` for the latter;
  * ``per_class``, ``num_classes``, ``num_samples``, ``class_balance`` (``balanced``: every class ``per_class``
    times, else ``unbalanced``), ``classes`` (names);
  * ``seed`` (sample i's noise depends on (seed, i) only), ``precision`` (``fp32`` | ``bf16``);
  * ``encoder`` / ``encoder_sha256`` — the export that decodes the tokens (sha256 over its config.json and
    model.safetensors; a VAE referenced by path is named in that config.json, not hashed);
  * ``decoder`` — the decoder settings: ``tau`` (0: no noise at inference), ``image_size``, ``dtype``;
  * ``npz_sha256`` / ``npz_rows`` — the samples file itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ov3common.checkpoint import atomic_write_json, sha256_file

FORMAT = "ov3-sampling-manifest-1"
PROTOCOL_FIELDS = ("weights", "sampler", "steps", "cfg_scale", "cfg_interval", "guidance", "per_class",
                   "num_classes", "num_samples", "class_balance", "seed", "precision", "decoder")


class ManifestError(ValueError):
    """A samples file without a manifest, or with one that does not match the protocol asked for."""


def manifest_path(npz: str | Path) -> Path:
    p = Path(npz)
    return p.with_name(p.stem + ".manifest.json")


def checkpoint_file_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; read from the checkpoint folder's ``state.json`` file list when it has one."""
    p = Path(path)
    state = p.parent / "state.json"
    if state.is_file():
        try:
            info = json.loads(state.read_text()).get("files", {}).get(p.name, {})
        except json.JSONDecodeError:
            info = {}
        if info.get("sha256") and info.get("size") == p.stat().st_size:
            return str(info["sha256"])
    return sha256_file(p)


def export_sha256(export_dir: str | Path) -> str:
    """sha256 of an encoder export: its config.json and model.safetensors, in that order."""

    root = Path(export_dir)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        f = root / name
        if not f.is_file():
            raise FileNotFoundError(f"encoder export: missing {f}")
        h.update(f"{name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def class_balance(labels) -> tuple[str, int]:
    """('balanced', per_class) when every class present appears equally often, else ('unbalanced', max count)."""

    counts = np.bincount(np.asarray(labels, dtype=np.int64)) if len(labels) else np.zeros(0, int)
    present = counts[counts > 0]
    if len(present) and (present == present[0]).all() and len(present) == len(counts):
        return "balanced", int(present[0])
    return "unbalanced", int(present.max()) if len(present) else 0


def guidance_kind(cfg_scale: float, autoguidance: bool) -> str:
    if autoguidance:
        return "autoguidance"
    return "none" if float(cfg_scale) == 1.0 else "cfg"


def write_manifest(npz: str | Path, fields: dict) -> Path:
    """Write ``<stem>.manifest.json`` beside ``npz`` (adds the format, the npz's sha256 and row count)."""


    p = Path(npz)
    with np.load(p, allow_pickle=False) as z:
        rows = int(z["arr_0"].shape[0])
    data = {"format": FORMAT, **fields, "npz": p.name, "npz_sha256": sha256_file(p), "npz_rows": rows}
    if "cfg_interval" in data:
        data["cfg_interval"] = [float(x) for x in data["cfg_interval"]]
    atomic_write_json(manifest_path(p), data)
    return manifest_path(p)


def read_manifest(npz: str | Path) -> dict | None:
    """The manifest beside ``npz`` (None if there is none); checks it describes this very file."""
    m = manifest_path(npz)
    if not m.is_file():
        return None
    data = json.loads(m.read_text())
    if data.get("format") != FORMAT:
        raise ManifestError(f"{m}: format {data.get('format')!r}, expected {FORMAT!r}")
    digest = sha256_file(npz)
    if data.get("npz_sha256") != digest:
        raise ManifestError(f"{m}: written for another file (npz sha256 {data.get('npz_sha256')}, the file's "
                            f"{digest}): the samples were replaced after sampling")
    return data


def protocol(manifest: dict | None) -> dict:
    return {k: (manifest or {}).get(k) for k in PROTOCOL_FIELDS}


def _norm(v):
    if isinstance(v, float):
        return round(v, 9)
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    return v


def differences(a: dict | None, b: dict | None, fields: tuple[str, ...] = PROTOCOL_FIELDS) -> dict[str, tuple]:
    """{field: (a's value, b's value)} for the protocol fields that differ."""
    pa, pb = protocol(a), protocol(b)
    return {k: (pa[k], pb[k]) for k in fields if _norm(pa[k]) != _norm(pb[k])}


def mismatches(manifest: dict, expected: dict) -> dict[str, tuple]:
    """{field: (found, expected)} for the fields of ``expected`` (a subset of the protocol) the manifest breaks."""
    return {k: (manifest.get(k), v) for k, v in expected.items() if _norm(manifest.get(k)) != _norm(v)}
