import importlib
from dataclasses import dataclass, field

import pytest

from ov3common.config import (
    ConfigError,
    check_paths,
    choice_field,
    load_config,
    parse_cli,
    path_field,
    save_config,
)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Cfg:
    name: str = "toy"
    steps: int = 10
    data_dir: str = path_field("", kind="dir")
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", "steps: 20\noptim:\n  lr: 0.5\n")
    cfg = load_config(Cfg, p, ["optim.betas=[0.8,0.9]", "name=x"])
    assert (cfg.steps, cfg.optim.lr, list(cfg.optim.betas), cfg.name) == (20, 0.5, [0.8, 0.9], "x")


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    p = write(tmp_path, "a.yaml", "optim:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'") as e:
        load_config(Cfg, p)
    assert "a.yaml" in str(e.value)


def test_unknown_key_in_override(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'stepz'"):
        load_config(Cfg, None, ["stepz=3"])


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "a.yaml", "steps: many\n")
    with pytest.raises(ConfigError, match=r"bad value for key 'steps'"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match=r"'optim\.lr'"):
        load_config(Cfg, None, ["optim.lr=fast"])


def test_base_inheritance_and_cycle(tmp_path):
    write(tmp_path, "base.yaml", "steps: 5\nname: base\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nname: child\n")
    cfg = load_config(Cfg, child)
    assert (cfg.steps, cfg.name) == (5, "child")
    write(tmp_path, "c1.yaml", "_base_: c2.yaml\n")
    c2 = write(tmp_path, "c2.yaml", "_base_: c1.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Cfg, c2)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_paths_checked_before_compute(tmp_path):
    with pytest.raises(ConfigError, match=r"data_dir: directory does not exist: .*nowhere"):
        parse_cli(Cfg, [f"data_dir={tmp_path}/nowhere"])
    f = write(tmp_path, "file.txt", "x")
    with pytest.raises(ConfigError, match="data_dir: directory does not exist"):
        check_paths(load_config(Cfg, None, [f"data_dir={f}"]))
    cfg = parse_cli(Cfg, [f"data_dir={tmp_path}", "steps=3"])
    assert cfg.steps == 3


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(Cfg, None, ["steps=7"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Cfg, tmp_path / "out" / "config.yaml")
    assert again == cfg


@dataclass
class Stage:
    resolution: int = 32
    steps: int = 10


@dataclass
class Staged:
    RENAMED = {"bf16": "precision", "optim.clip": "optim.grad_clip"}  # a plain class attribute: not a field
    precision: str = "fp32"
    stages: list[Stage] = field(default_factory=lambda: [Stage(32, 10), Stage(64, 5)])
    optim: Optim = field(default_factory=Optim)


def test_override_reaches_list_items():
    cfg = load_config(Staged, None, ["stages.1.steps=7", "stages.0.resolution=16", "optim.betas.1=0.99"])
    assert [(s.resolution, s.steps) for s in cfg.stages] == [(16, 10), (64, 7)]
    assert list(cfg.optim.betas) == [0.9, 0.99]
    cfg = load_config(Staged, None, ["stages=[{resolution: 8, steps: 1}]"])
    assert [(s.resolution, s.steps) for s in cfg.stages] == [(8, 1)]


@pytest.mark.parametrize("override, message", [
    ("stages.5.steps=1", r"key 'stages\.5': index 5 out of range \(the list has 2 items"),
    ("stages.x.steps=1", r"key 'stages\.x': 'x' is not a list index"),
    ("stages.0.stepz=1", r"unknown key 'stages\[0\]\.stepz'"),
    ("stages.0.steps=many", r"bad value for key 'stages\[0\]\.steps'"),
    ("precision.x=1", r"key 'precision' is a value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Staged, None, [override])


def test_renamed_keys_are_refused_with_the_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: key 'bf16' was renamed: use 'precision'"):
        load_config(Staged, None, ["bf16=true"])
    p = write(tmp_path, "old.yaml", "optim:\n  clip: 1.0\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: key 'optim\.clip' was renamed: use 'optim\.grad_clip'"):
        load_config(Staged, p)


@dataclass
class WithChoice:
    precision: str = choice_field("fp32", ("fp32", "bf16"))
    stages: list[Stage] = field(default_factory=lambda: [Stage(32, 10)])


def test_choice_field_checked_at_load():
    assert load_config(WithChoice, None, ["precision=bf16"]).precision == "bf16"
    with pytest.raises(ConfigError, match=r"bad value for key 'precision': 'fp16' is not one of fp32 \| bf16"):
        load_config(WithChoice, None, ["precision=fp16"])


@dataclass
class NeedsInput:
    source: str = path_field("", "dir", required=True)
    note: str = "x"


def test_required_path_has_no_default_and_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^source: required"):
        check_paths(load_config(NeedsInput))
    check_paths(load_config(NeedsInput, overrides=[f"source={tmp_path}"]))
    with pytest.raises(ValueError):
        path_field("data/toy", "dir", required=True)


def test_empty_override_blanks_a_string():
    assert load_config(NeedsInput, overrides=["note="]).note == ""


@pytest.mark.parametrize("schema, key, others", [
    ("rae_generation.config:CacheConfig", "source", []), ("rae_generation.config:CacheConfig", "encoder", ["source"]),
    ("rae_generation.config:SampleConfig", "run", [])])
def test_real_inputs_have_no_toy_default(schema, key, others, tmp_path):
    mod, name = schema.split(":")
    cfg = load_config(getattr(importlib.import_module(mod), name), overrides=[f"{k}={tmp_path}" for k in others])
    with pytest.raises(ConfigError, match=rf"^{key}: required"):
        check_paths(cfg)
