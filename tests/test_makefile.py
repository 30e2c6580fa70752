"""The Makefile runs the user's config unchanged: with real configs, no target prints a toy path (``make -n``); a toy
stage builds its missing inputs first; a real stage's missing input names the target that writes it, in one line."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ov3common import pipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# every config variable set to a real config of the repo
REAL = {
    "ENC_CFG": "configs/encoder/ov3_b2.yaml", "ENC_BASELINE_CFG": "configs/encoder/ov3_b2_baseline.yaml",
    "LLAVA_STAGE1": "configs/llava/real_stage1.yaml", "LLAVA_STAGE2": "configs/llava/real_stage2.yaml",
    "LLAVA_LORA": "configs/llava/real_lora.yaml", "RAE_CACHE_CFG": "configs/rae/cache_imagenet.yaml",
    "RAE_CFG": "configs/rae/imagenet_xl.yaml", "RAE_SAMPLE_CFG": "configs/rae/sample_imagenet.yaml",
    "EVAL_CONFIG": "configs/eval/real.yaml", "DEC_CFG": "configs/encoder/decoder_official_b2.yaml",
}
# targets that exist for the toy world only (or list the defaults), with the reason
TOY_ONLY = {
    "help": "lists the variables' (toy) defaults",
    "data": "builds the toy world", "clean-toy": "removes the toy world and toy runs",
    "toy-vae": "the toy world's VAE", "toy-llm": "the toy world's LLM",
    "ablate-encoder": "toy-scale ablations", "rae-classacc": "class accuracy by classifiers trained on the toy split",
    "demo": "the toy chain", "bench": "speed benchmarks (random weights, the toy VAE and its images)", "demo-baselines": "the toy chain's baseline rows",
}
TOY = re.compile(r"data/toy|runs/toy|toy[^ /]*\.yaml")


def targets() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return re.findall(r"^([a-z][a-z0-9-]*):.*## ", text, flags=re.M)


def make_n(target: str, **var: str) -> str:
    out = subprocess.run(["make", "-n", "--no-print-directory", target, *(f"{k}={v}" for k, v in var.items())],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_real_configs_exist():
    for cfg in REAL.values():
        assert (ROOT / cfg).is_file(), cfg
        assert not pipeline.is_toy(cfg)


@pytest.mark.parametrize("target", [t for t in targets() if t not in TOY_ONLY])
def test_make_n_with_real_configs_prints_no_toy_path(target):
    out = make_n(target, **REAL)
    assert not TOY.search(out), f"make -n {target} with real configs names a toy path:\n{out}"


def test_every_target_is_classified_and_help_is_in_pipeline_order():
    ts = targets()
    assert set(TOY_ONLY) <= set(ts)
    order = ["data", "pretrain-encoder", "llava-stage1", "llava-stage2", "cache-rae-latents", "rae-train",
             "rae-sample", "eval-all"]
    assert [ts.index(t) for t in order] == sorted(ts.index(t) for t in order)
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert [out.index(f"  {t} ") for t in order] == sorted(out.index(f"  {t} ") for t in order)
    for var in REAL:
        assert f"  {var} " in out


def test_the_hooks_check_generic_real_paths():
    for t in ("pretrain-encoder", "cache-rae-latents", "rae-train", "eval-all"):
        out = make_n(t, ENC_CFG="/data/x.yaml", RAE_CACHE_CFG="/data/x.yaml", RAE_CFG="/data/x.yaml",
                     EVAL_CONFIG="/data/x.yaml")
        assert "/data/x.yaml" in out and not TOY.search(out), out


def test_toy_defaults_pass_only_the_toy_config():
    out = make_n("rae-train")
    assert "--config configs/rae/toy.yaml" in out
    assert "data.latents=" not in out and "out_dir=" not in out  # nothing appended after the config


# ---------------------------------------------------------------- ov3common.pipeline (what `need` decides)
def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_missing_input_of_a_real_config_names_its_target_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    real = write(tmp_path / "imagenet_x.yaml", f"_base_: {ROOT}/configs/rae/imagenet_xl.yaml\n"
                 f"data:\n  latents: {tmp_path}/nowhere/latents\n")
    cache = write(tmp_path / "cache_x.yaml", f"source: /data/imagenet/train\nout_dir: {tmp_path}/nowhere/latents\n")
    rc = pipeline.need("rae-train", real, [], env={"RAE_CACHE_CFG": cache})
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"data.latents: {tmp_path}/nowhere/latents does not exist" in err[0]
    assert f"`make cache-rae-latents RAE_CACHE_CFG={cache}` writes it" in err[0]
    # a config of the repo that writes the folder is named even when the variable holds another one
    rc = pipeline.need("rae-train", "configs/rae/imagenet_xl.yaml", [], env={})
    err = capsys.readouterr().err
    if not Path("runs/ov3_b2/rae/latents/train").exists():
        assert rc == 2 and "RAE_CACHE_CFG=configs/rae/cache_imagenet.yaml" in err


def test_toy_config_builds_missing_stages_in_pipeline_order(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    calls = tmp_path / "calls"
    fake_make = write(tmp_path / "fake_make.sh", f'#!/bin/sh\necho "$@" >> {calls}\n')
    Path(fake_make).chmod(0o755)
    world = tmp_path / "world"
    enc = write(tmp_path / "toy_enc.yaml", f"out_dir: {tmp_path}/enc\n")
    cache = write(tmp_path / "toy_cache.yaml", f"source: {world}/classes/train\nencoder: {tmp_path}/enc/export\n"
                  f"out_dir: {tmp_path}/rae/latents\n")
    rae = write(tmp_path / "toy_rae.yaml", f"out_dir: {tmp_path}/rae\ndata:\n  latents: {tmp_path}/rae/latents\n")
    env = {"DATA": str(world), "ENC_CFG": enc, "RAE_CACHE_CFG": cache, "RAE_CFG": rae, "OV3_MAKE": fake_make}
    assert pipeline.need("rae-train", rae, [], env=env) == 0
    assert calls.read_text().split("\n")[0] == f"--no-print-directory cache-rae-latents RAE_CACHE_CFG={cache} ARGS="
    calls.unlink()
    assert pipeline.need("cache-rae-latents", cache, [], env=env) == 0
    lines = calls.read_text().strip().split("\n")
    assert [ln.split()[1] for ln in lines] == ["data", "pretrain-encoder"]  # pipeline order
    # an override reaches the check: the input given on the command line exists, nothing to build
    calls.unlink()
    assert pipeline.need("rae-train", rae, [f"data.latents={tmp_path}"], env=env) == 0
    assert not calls.exists()


def test_get_prints_a_value_through_base(capsys):
    assert pipeline.main(["get", str(ROOT / "configs/llava/real_lora.yaml"), "model.vision_tower"]) == 0
    assert capsys.readouterr().out.strip() == "runs/ov3_b2/encoder/export"
    assert pipeline.main(["get", str(ROOT / "configs/llava/real_lora.yaml"), "model.nope"]) == 2
