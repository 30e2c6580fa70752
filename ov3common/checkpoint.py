"""Checkpoint I/O: safetensors for tensors, JSON for everything else, atomic writes, keep-last-N, validated resume.

A checkpoint is a folder ``<root>/step_00001234/``::

    state.json                 # the non-tensor tree, the file manifest (size + sha256 of every file), the step
    <group>.safetensors        # the tensors of each top-level key of ``state`` (model, optimizer, ema, ...)
    rank_00000.json/.safetensors   # per-rank state (RNG), one pair per rank

It is written into ``step_00001234.tmp`` and renamed into place only when complete (a rename is atomic), so a
crash during a save leaves the previous checkpoint as it was. On load the manifest is verified; a partial or
corrupt checkpoint is reported and skipped in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ov3common import dist as D
from ov3common.log import get_logger

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "save_safetensors",
    "load_safetensors",
    "capture_rng",
    "restore_rng",
    "model_state",
    "load_model_state",
    "optim_state",
    "load_optim_state",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "flatten_state",
    "unflatten_state",
]

log = get_logger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


# ----------------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then fsync and rename the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_format_json(path: str | os.PathLike, fmt: str, what: str, hint: str = "") -> dict:
    """A JSON file that names its ``"format"`` (export configs, cache metadata): ``FileNotFoundError`` when it is
    missing and ``ValueError`` when its format is not ``fmt``, each naming ``what`` and the file (and ``hint``,
    e.g. the make target that writes it)."""
    p = Path(path)
    tail = f" ({hint})" if hint else ""
    if not p.is_file():
        raise FileNotFoundError(f"{what}: missing {p}{tail}")
    data = json.loads(p.read_text())
    if data.get("format") != fmt:
        raise ValueError(f"{what} {p}: format is {data.get('format')!r}, expected {fmt!r}{tail}")
    return data


def _dedupe_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights, views): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors write (temp file + rename). ``metadata`` values are stored as strings."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    tensors = _dedupe_storage(tensors)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file does not exist: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e


# ------------------------------------------------------------------------------------------- state flattening
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into (a JSON-able tree, {key: tensor}). Tensors become ``{"__tensor__": key}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v, f"{key}.{k}" if key else k) for k, v in x.items()}
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot checkpoint value of type {type(x).__name__} at '{key}'")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return np.asarray(x["__ndarray__"], dtype=x["dtype"])
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(tree)


# ------------------------------------------------------------------------------------------------ RNG, models
def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    if not state:
        return
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _sd_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict with plain parameter names; works for plain, DDP and FSDP2 modules."""

    return get_model_state_dict(model, options=_sd_options())


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, sd, options=_sd_options())


def optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names (portable across DDP/FSDP2 and world sizes)."""

    return get_optimizer_state_dict(model, optimizer, options=_sd_options())


def load_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    set_optimizer_state_dict(model, optimizer, sd, options=_sd_options())


# ------------------------------------------------------------------------------------------------- manager
def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the one hash of files in the project: checkpoints, manifests, provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    """Save / find / load training checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, verify: str = "sha256"):
        if verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))
        self.verify = verify

    # -- listing
    def all(self) -> list[Path]:
        """Final (renamed) checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> str | None:
        """The newest checkpoint that passes validation (None if there is none)."""
        for p in reversed(self.all()):
            if self._problem(p) is None:
                return str(p)
        return None

    # -- save
    def save(self, step: int, state: dict, rank_state: dict | None = None) -> str:
        """Write a checkpoint for ``step``. Collective under torchrun: every rank calls it (with its rank_state)."""
        rank, world = D.get_rank(), D.get_world_size()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        D.barrier()
        if rank == 0:
            tree: dict[str, Any] = {}
            for group, value in state.items():
                sub, tensors = flatten_state(value, "")
                tree[group] = sub
                if tensors:
                    save_file(_dedupe_storage(tensors), str(tmp / f"{group}.safetensors"))
        if rank_state is not None:
            sub, tensors = flatten_state(rank_state, "")
            name = f"rank_{rank:05d}"
            (tmp / f"{name}.json").write_text(json.dumps(sub))
            if tensors:
                save_file(_dedupe_storage(tensors), str(tmp / f"{name}.safetensors"))
        D.barrier()
        if rank == 0:
            files = {}
            for f in sorted(tmp.iterdir()):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f) if self.verify == "sha256" else None}
            meta = {"format": FORMAT_VERSION, "step": step, "world_size": world, "files": files, "tree": tree}
            (tmp / "state.json").write_text(json.dumps(meta, sort_keys=True))
            with open(tmp / "state.json", "rb+") as fh:
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        D.barrier()
        return str(final)

    def _prune(self) -> None:
        ckpts = self.all()
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load
    def _problem(self, path: Path) -> str | None:
        meta_path = path / "state.json"
        if not meta_path.is_file():
            return "state.json is missing (partial write)"
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"state.json is unreadable ({e})"
        if meta.get("format") != FORMAT_VERSION or "files" not in meta:
            return f"state.json has an unknown format {meta.get('format')!r}"
        for name, info in meta["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != info["size"]:
                return f"{name} has {f.stat().st_size} bytes, expected {info['size']} (truncated?)"
            if self.verify == "sha256" and info.get("sha256") and sha256_file(f) != info["sha256"]:
                return f"{name} fails its sha256 check (corrupt)"
        return None

    def load(self, path: str | os.PathLike | None = None) -> tuple[dict, dict] | None:
        """(state, rank_state) of ``path`` or of the newest valid checkpoint; None if there is none.

        With an explicit ``path`` a bad checkpoint raises :class:`CheckpointError`; otherwise bad ones are logged and
        skipped in favour of the previous good one."""
        candidates = [Path(path)] if path is not None else list(reversed(self.all()))
        for p in candidates:
            problem = self._problem(p)
            if problem is not None:
                if path is not None:
                    raise CheckpointError(f"checkpoint {p} is unusable: {problem}")
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", p, problem)
                continue
            return self._read(p)
        return None

    def _read(self, p: Path) -> tuple[dict, dict]:
        meta = json.loads((p / "state.json").read_text())
        state = {}
        for group, sub in meta["tree"].items():
            f = p / f"{group}.safetensors"
            tensors = load_safetensors(f) if f.is_file() else {}
            state[group] = unflatten_state(sub, tensors)
        rank = D.get_rank()
        name = f"rank_{rank:05d}"
        rank_state: dict = {}
        if (p / f"{name}.json").is_file():
            f = p / f"{name}.safetensors"
            tensors = load_safetensors(f) if f.is_file() else {}
            rank_state = unflatten_state(json.loads((p / f"{name}.json").read_text()), tensors)
        elif meta.get("world_size", 1) != D.get_world_size():
            log.warning("checkpoint %s was written by %s ranks, now %s: per-rank state (RNG) not restored",
                        p, meta.get("world_size"), D.get_world_size())
        log.info("resumed from %s (step %s)", p, meta["step"])
        return state, rank_state
