from dataclasses import dataclass, field

import pytest

from ov3common.config import ConfigError, check_paths, load_config, parse_cli, path_field, save_config


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
