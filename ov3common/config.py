"""Typed configuration: OmegaConf structured configs (dataclasses) + YAML files + dotted CLI overrides.

Every runnable module does::

    cfg = parse_cli(TrainConfig, default_config="configs/encoder/toy.yaml")

which loads the dataclass defaults, merges the YAML (which may inherit another file with ``_base_: other.yaml``)
and the overrides (``train.steps=100``), and rejects unknown keys and wrong types *before any compute*, with a
message naming the key. Fields declared with :func:`path_field` are checked to exist.

Overrides reach into lists by index (``train.stages.1.lr=1e-4``). A schema may declare renamed keys as a
``RENAMED: ClassVar[dict[str, str]]`` (old dotted key -> new dotted key): a config or override that still uses an
old name is refused with a message naming the new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "ConfigError",
    "path_field",
    "choice_field",
    "load_config",
    "parse_cli",
    "check_paths",
    "save_config",
    "to_dict",
    "import_object",
]

_PATH_KINDS = ("file", "dir", "exists")
_BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file or path involved)."""


def path_field(default: str = "", kind: str = "exists", required: bool = False) -> Any:
    """A string field holding a filesystem path. Non-empty values are checked by :func:`check_paths`.

    ``kind``: ``"file"`` (must be a file), ``"dir"`` (must be a directory), ``"exists"`` (either).
    ``required``: an empty value is an error (an input with no sensible default: no toy path stands in for it).
    """
    if kind not in _PATH_KINDS:
        raise ValueError(f"path_field kind must be one of {_PATH_KINDS}, got {kind!r}")
    if required and default:
        raise ValueError("a required path_field has no default")
    return dataclasses.field(default=default, metadata={"path": kind + ("!" if required else "")})


def choice_field(default: str, choices: Sequence[str]) -> Any:
    """A string field that must be one of ``choices`` (checked when the config is loaded, naming the key)."""
    if default not in choices:
        raise ValueError(f"choice_field default {default!r} is not one of {tuple(choices)}")
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving ``_base_`` inheritance (relative to the file)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{_BASE_KEY}: circular inheritance: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file does not exist: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {_BASE_KEY} must be a path string")
    parent = _read_yaml(path.parent / base, (*seen, path))
    return _deep_merge(parent, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    if isinstance(e, ConfigKeyError | ConfigAttributeError):
        msg = f"{source}: unknown key '{key}'"
    elif isinstance(e, ValidationError):
        msg = f"{source}: bad value for key '{key}': {getattr(e, 'msg', e)}"
    else:
        msg = f"{source}: key '{key}': {getattr(e, 'msg', e)}"
    return ConfigError(msg)


def _dotted_keys(data: dict, prefix: str = ""):
    for k, v in data.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, dict):
            yield from _dotted_keys(v, key + ".")


def _check_renamed(schema: type, keys, source: str) -> None:
    renamed: dict[str, str] = getattr(schema, "RENAMED", {})
    for key in keys:
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                raise ConfigError(f"{source}: key '{key}' was renamed: use '{new}{key[len(old):]}'")


def _apply_override(cfg: DictConfig, key: str, text: str) -> None:
    """``key=text`` into ``cfg`` (in place); list items by index; errors name the key."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1] if len(parts) > 1 else []):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, ListConfig):
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"command line: key '{where}': '{part}' is not a list index")
            i = int(part)
            if not -len(node) <= i < len(node):
                raise ConfigError(f"command line: key '{where}': index {i} out of range (the list has "
                                  f"{len(node)} items; set the whole list to change its length)")
            node = node[i]
        elif isinstance(node, DictConfig):
            if part not in node:
                raise ConfigError(f"command line: unknown key '{where}'")
            node = node[part]
        else:
            break
    if len(parts) > 1 and not isinstance(node, DictConfig | ListConfig):
        raise ConfigError(f"command line: key '{'.'.join(parts[:-1])}' is a value, it has no sub-key '{parts[-1]}'")
    if isinstance(node, ListConfig):
        last = parts[-1]
        if not last.lstrip("-").isdigit() or not -len(node) <= int(last) < len(node):
            raise ConfigError(f"command line: key '{key}': bad list index '{last}' (the list has {len(node)} items)")
    try:
        value = OmegaConf.from_dotlist([f"v={text}"])["v"]
        if value is None and text == "":
            value = ""  # `key=` blanks a string (YAML would read it as null)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        raise _explain(e, "command line") from e


def load_config(schema: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults of ``schema`` ← YAML at ``path`` ← dotted ``overrides``; typed and closed (struct mode)."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path:
        data = _read_yaml(Path(path))
        _check_renamed(schema, _dotted_keys(data), str(path))
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from e
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override must look like key=value, got {bad[0]!r}")
    _check_renamed(schema, [o.split("=", 1)[0] for o in overrides], "command line")
    with read_write(cfg):  # a frozen dataclass schema is read-only; overrides still apply (as a merge would)
        for o in overrides:
            key, text = o.split("=", 1)
            _apply_override(cfg, key.strip(), text)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path or "config")) from e
    for key, choices, value in _walk_fields(schema, cfg, "", "choices"):
        if value not in choices:
            raise ConfigError(f"{path or 'config'}: bad value for key '{key}': {value!r} is not one of "
                              f"{' | '.join(choices)}")
    return cfg


def _walk_fields(schema: Any, node: Any, prefix: str, tag: str):
    """Yield (dotted key, field metadata[tag], value) for every field tagged ``tag`` ("path" or "choices") in a
    structured config, through nested configs and lists of them."""
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = node[f.name] if isinstance(node, DictConfig) and f.name in node else None
        if tag in f.metadata:
            yield key, f.metadata[tag], value
        elif isinstance(value, DictConfig):
            yield from _walk_fields(OmegaConf.get_type(value), value, key + ".", tag)
        elif isinstance(value, ListConfig):
            for i, item in enumerate(value):
                if isinstance(item, DictConfig):
                    yield from _walk_fields(OmegaConf.get_type(item), item, f"{key}.{i}.", tag)


def check_paths(cfg: DictConfig) -> None:
    """Check every non-empty :func:`path_field` exists (as file / dir). Raises :class:`ConfigError`."""
    for key, kind, value in _walk_fields(OmegaConf.get_type(cfg), cfg, "", "path"):
        kind, required = kind.rstrip("!"), kind.endswith("!")
        if not value:
            if required:
                raise ConfigError(f"{key}: required (a {'folder' if kind == 'dir' else 'path'}; it has no default)")
            continue
        p = Path(str(value)).expanduser()
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{key}: file does not exist: {p}")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{key}: directory does not exist: {p}")
        if kind == "exists" and not p.exists():
            raise ConfigError(f"{key}: path does not exist: {p}")


def parse_cli(
    schema: type,
    argv: Sequence[str] | None = None,
    default_config: str | None = None,
    description: str | None = None,
) -> DictConfig:
    """``--config PATH`` plus dotted overrides; validates types, keys and paths before returning."""
    ap = argparse.ArgumentParser(description=description or schema.__doc__)
    ap.add_argument("--config", default=default_config, help="YAML config (may use _base_: other.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    cfg = load_config(schema, args.config, args.overrides)
    check_paths(cfg)
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically) beside the outputs."""
    # imported here, so `ov3common.pipeline get` (run by make recipes) imports no torch
    from ov3common.checkpoint import atomic_write_text  # noqa: PLC0415

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def import_object(spec: str, key: str = "spec"):
    """The object a ``module:name`` string names (a hook in a config: ``eval.adapters:llava_predictor``). This is how a
    lower layer calls code of a higher one (a trainer's in-training evaluation in ``eval``) without importing it. A
    malformed spec is a :class:`ConfigError`, a missing module or name an ``ImportError``; both name ``key``."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{key}: expected 'module:name', got {spec!r}")
    mod, name = spec.split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):  # the named module itself is missing (not one it imports)
            raise ModuleNotFoundError(f"{key}: no module {mod!r} (from {spec!r})", name=e.name) from e
        raise
    if not hasattr(module, name):
        raise ImportError(f"{key}: module {mod!r} has no {name!r}", name=mod)
    return getattr(module, name)
