"""The real configs run unchanged through ``make``, as a real-scale user runs them, on real-format stand-ins:
a FLUX.1-architecture VAE in diffusers layout (random weights, tiny widths), Recap-DataComp-layout shards
(``KEY.txt`` alt-text, ``KEY.json`` ``re_caption``), an ImageNet-layout folder, a tiny HF Llama with a real
SentencePiece tokenizer, LLaVA JSONs, lmms-lab-layout POPE / SEED-Bench parquet and a VGG16 weights file for LPIPS.
Only asset paths (the configs' ``/data/...``) and sizes are overridden (ARGS); the run folders are the configs' own
(``runs/ov3_b2/...``, under a scratch folder with ``configs/`` linked in), so the chain encoder -> RAE cache -> RAE ->
samples, encoder -> LLaVA stage 1 -> stage 2, and eval-all over them is the configs' own. Every run's saved resolved
config is checked for the stand-ins (and for no toy path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from encoder.data import DataConfig, fields
from eval import standins as S
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]

TINY_ENCODER = ("model.size=tiny model.text_width=32 model.text_depth=1 model.text_heads=2 "
                "model.text_decoder_width=32 model.text_decoder_depth=1 model.text_decoder_heads=2 "
                "data.max_text_len=32 data.val_size=4 data.num_workers=0 train.log_every=1 train.ckpt_every=4 "
                "train.stages.0.resolution=32 train.stages.0.steps=2 train.stages.0.batch_size=4 "
                "train.stages.0.warmup_steps=1 train.stages.1.resolution=64 train.stages.1.steps=2 "
                "train.stages.1.batch_size=4 train.stages.1.warmup_steps=1")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    pytest.importorskip("mistral_common")
    ws = tmp_path_factory.mktemp("real_e2e")
    (ws / "configs").symlink_to(REPO / "configs")  # the repo's configs, unchanged; runs/ land in ws
    if (REPO / "weights").is_dir():  # the FID weights of `make fid-weights`, when this checkout has them
        (ws / "weights").symlink_to(REPO / "weights")
    a = ws / "assets"
    S.flux_vae(a / "FLUX.1-dev" / "vae", block_out_channels=[32, 32, 32, 32])
    S.datacomp_shards(a / "recap" / "train", shards=2, per_shard=8, size=64, seed=0)
    S.datacomp_shards(a / "recap" / "val", shards=1, per_shard=4, size=64, seed=1)
    S.sp_tokenizer(a / "tok")
    S.vgg16_features(a / "vgg16-397923af.pth")
    S.imagenet_folder(a / "imagenet", classes=4, per_class=4, size=64)
    S.llama(a / "llm", hidden=64, intermediate=128, layers=2, heads=4)
    llava = S.llava_json(a / "llava", n=8, size=64)
    S.lmms_pope(a / "pope", images=2, size=64)
    S.lmms_seed(a / "seed", questions=4, size=64)
    return {"ws": ws, "a": a, "llava": llava}


def make(world: dict, target: str, args: str, timeout: int = 600, **var: str) -> str:
    env = {**os.environ, "OV3_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["make", "-f", str(REPO / "Makefile"), "--no-print-directory", target, f"ARGS={args}",
           *(f"{k}={v}" for k, v in var.items())]
    r = subprocess.run(cmd, cwd=world["ws"], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"make {target}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout + r.stderr


def saved(path: Path) -> dict:
    text = path.read_text()
    assert "data/toy" not in text and "runs/toy" not in text, f"{path} names a toy path"
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def test_real_configs_through_make_on_standins(world):
    ws, a, llava = world["ws"], world["a"], world["llava"]
    run = ws / "runs" / "ov3_b2"
    # a real config's missing input: one line naming the target that writes it, before any compute
    r = subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "rae-train",
                        "RAE_CFG=configs/rae/imagenet_xl.yaml"], cwd=ws, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert ("rae-train: data.latents: runs/ov3_b2/rae/latents/train does not exist; `make cache-rae-latents "
            "RAE_CACHE_CFG=configs/rae/cache_imagenet.yaml` writes it") in r.stderr
    assert "Traceback" not in r.stderr

    # encoder: ov3_b2.yaml with the assets' paths and tiny sizes
    make(world, "pretrain-encoder", f"vae.path={a}/FLUX.1-dev/vae "
         f"data.train_shards={a}/recap/train/{{00000..00001}}.tar data.val_shards={a}/recap/val/00000.tar "
         f"data.tokenizer={a}/tok loss.lpips_backbone_path={a}/vgg16-397923af.pth {TINY_ENCODER}",
         ENC_CFG="configs/encoder/ov3_b2.yaml")
    enc = saved(run / "encoder" / "config.yaml")
    assert enc["vae"]["path"] == f"{a}/FLUX.1-dev/vae" and enc["data"]["tokenizer"] == f"{a}/tok"
    assert enc["data"]["train_shards"].startswith(f"{a}/recap/train/") and enc["data"]["preset"] == "recap_datacomp"
    assert fields(DataConfig(**{k: v for k, v in enc["data"].items() if k in DataConfig.__dataclass_fields__})) == (
        "txt;json:org_caption", "json:re_caption")
    rows = [json.loads(x) for x in (run / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("data/recap_from_alt", 0) for r in rows), "the stand-in shards carry re_caption: none fall back"
    assert enc["loss"]["lpips_backbone_path"] == f"{a}/vgg16-397923af.pth" and enc["loss"]["w_lpips"] == 1.0
    assert (enc["train"]["schedule"], enc["train"]["strategy"], enc["train"]["precision"]) == ("per_stage", "fsdp2", "bf16")
    export = json.loads((run / "encoder" / "export" / "config.json").read_text())
    assert export["image_size"] == 64 and (run / "encoder" / "export" / "vae" / "config.json").is_file()
    rows = [json.loads(x) for x in (run / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert any("lpips" in x for x in rows)

    # RAE: the cache of the ImageNet-layout folder through that export (with flips), DiT-DH, the 50K-protocol sampler
    make(world, "cache-rae-latents", f"source={a}/imagenet image_size=64 batch_size=8 num_workers=0 shard_size=8",
         RAE_CACHE_CFG="configs/rae/cache_imagenet.yaml")
    cache = saved(run / "rae" / "latents" / "train" / "cache_config.yaml")
    assert cache["source"] == f"{a}/imagenet" and cache["encoder"] == "runs/ov3_b2/encoder/export" and cache["flip"]
    make(world, "rae-train", "model.size=tiny train.steps=3 train.batch_size=4 train.constant_steps=1 "
         "train.decay_end_step=2 train.log_every=1 train.ckpt_every=3 data.num_workers=0",
         RAE_CFG="configs/rae/imagenet_xl.yaml")
    rae = saved(run / "rae" / "xl" / "config.yaml")
    assert rae["data"]["latents"] == "runs/ov3_b2/rae/latents/train" and rae["data"]["flip"]
    assert (rae["train"]["schedule"], rae["train"]["betas"]) == ("linear", [0.9, 0.95])
    gen = json.loads((run / "rae" / "xl" / "generator.json").read_text())
    assert gen["encoder"] == str((run / "encoder" / "export").resolve()) and len(gen["classes"]) == 4
    make(world, "rae-sample", "per_class=1 guidance.steps=2 batch_size=4", RAE_SAMPLE_CFG="configs/rae/sample_imagenet.yaml")
    assert saved(run / "rae" / "xl" / "samples" / "samples.yaml")["run"] == "runs/ov3_b2/rae/xl"

    # LLaVA-1.5 stage 1 (ZeRO-2) and stage 2 (ZeRO-3), 2 processes, on the tiny Llama with the SentencePiece tokenizer
    common = (f"model.llm={a}/llm data.image_root={llava['images']} data.num_workers=0 train.max_steps=2 "
              "train.batch_size=2 train.tf32=false train.ckpt_every=0 train.log_every=1 model.model_max_length=256")
    make(world, "llava-stage1", f"{common} data.train=[{llava['pretrain']}]", timeout=900,
         LLAVA_STAGE1="configs/llava/real_stage1.yaml", NPROC="2")
    s1 = saved(run / "llava" / "stage1" / "train_config.yaml")
    assert s1["model"]["llm"] == f"{a}/llm" and s1["model"]["vision_tower"] == "runs/ov3_b2/encoder/export"
    assert s1["train"]["deepspeed"] == "configs/llava/zero2.json"
    make(world, "llava-stage2", f"{common} data.train=[{llava['instruct']}]", timeout=900,
         LLAVA_STAGE2="configs/llava/real_stage2.yaml", NPROC="2")
    s2 = saved(run / "llava" / "stage2" / "train_config.yaml")
    assert s2["model"]["pretrain_projector"] == "runs/ov3_b2/llava/stage1/mm_projector.safetensors"
    assert s2["train"]["deepspeed"] == "configs/llava/zero3.json" and s2["data"]["train"] == [str(llava["instruct"])]
    assert (run / "llava" / "stage2" / "model.safetensors").is_file()

    # eval-all over the run folders, on the lmms-lab-layout parquet and the ImageNet-layout folder
    make(world, "eval-all", f"pope.path={a}/pope seedbench.path={a}/seed rfid.images={a}/imagenet rfid.max_images=8 "
         f"rfid.batch_size=4 gfid.real={a}/imagenet gfid.real_per_class=2 gfid.per_class=1 gfid.batch_size=4 "
         "fid.batch_size=8 fid.kid_subsets=2 lpips.backbone=random llava.batch_size=4 llava.max_new_tokens=2",
         timeout=900, EVAL_CONFIG="configs/eval/real.yaml")
    summary = json.loads((ws / "reports" / "real" / "summary.json").read_text())
    cfg = summary["config"]
    assert (cfg["pope"]["path"], cfg["seedbench"]["path"], cfg["toy"]) == (f"{a}/pope", f"{a}/seed", False)
    b2, l2 = summary["rows"]
    assert b2["name"] == "OV3 B/2" and not b2["errors"], b2["errors"]
    assert {"pope", "seedbench", "seedbench_rank", "gfid", "rfid"} <= set(b2["results"])
    assert l2["name"] == "OV3 L/2" and set(l2["missing"]) >= {"rfid", "gfid"}  # no runs: "—", not an error
    assert not list(ws.glob("data")) and not (ws / "runs" / "toy").exists()  # no toy world, no toy run was built
