"""Export CLI from a training run, ablation planning/table, bench smoke (tiny sizes)."""

import json

import pytest
import torch

from encoder import bench
from encoder.ablate import AblateConfig, canonical, plan, table
from encoder.export import load_encoder, main
from encoder.train import Config, train
from ov3common.config import load_config
from tests.test_encoder_train import TINY, stages, toy_root  # noqa: F401 (session fixture)


def test_export_cli_from_run_and_random(toy_root, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(load_config(Config, "configs/encoder/toy.yaml",
                      [f"out_dir={run}", f"data.root={toy_root}", *TINY, stages((16, 2, 8)), "export_dir=none"]))
    assert not (run / "export").exists()
    main(["--run", str(run), "--out", str(tmp_path / "exp")])
    enc = load_encoder(tmp_path / "exp")
    assert enc.image_size == 16 and enc.config["trained_config"]["model"]["size"] == "tiny"
    main(["--random", str(tmp_path / "rnd"), "--image-size", "32"])
    assert load_encoder(tmp_path / "rnd").num_tokens == 4
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        main(["--run", str(tmp_path / "nothing")])


def test_ablation_plan_dedupes_and_table():
    cfg = AblateConfig()
    runs = plan(cfg)
    assert len(runs) == 11
    keys = {canonical(ov, 0.8, 2.0) for _, _, ov in runs}
    assert len(keys) == 9  # tau=0.8, und/rec=2 and "both" are the same run
    md = table([{"group": "tau", "label": "tau=0", "psnr": 20.0, "r1": 0.5,
                 "losses": {"caption": 1.0, "contrastive": 2.0, "pixel_l1": 0.1, "latent_l1": 0.4}}])
    assert "| tau | tau=0 | 20.00 | 0.500 | 1.0000 | 2.0000 | 0.1000 | 0.4000 |" in md
    with pytest.raises(ValueError, match="branches"):
        plan(AblateConfig(branches=["nope"]))


def test_bench_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = bench.main(["sizes=[tiny]", "mfu_size=tiny", "resolution=32", "batch=2", "mfu_batches=[8]", "warmup=1", "rounds=2",
                    "compile_sizes=[]", "vae_arch=tiny", "vae_resolution=16", "vae_rounds=1", "lpips=false", "threads=1",
                    f"out={tmp_path / 'b.json'}"])
    finally:
        torch.set_num_threads(threads)
    v = res["vs_timm"][0]
    assert [(r["size"], r["precision"]) for r in res["vs_timm"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert v["ours_over_timm"]["median"] > 0 and v["ours_over_timm_fused"]["rounds"] == 2 and 0 < v["mfu"] < 1
    assert v["params_ours"] == pytest.approx(v["params_timm"], rel=0.05)
    assert v["flops_ratio_ours_over_timm"] == pytest.approx(1.0, rel=0.02)  # equal work
    vae = res["frozen_vae"]
    assert vae["ov3_step"]["speedup_cached"]["median"] > 0
    assert vae["vae_precision"]["effect_vs_fp32"]["fp32"]["latent_max_abs"] == 0
    assert 0 < vae["vae_precision"]["effect_vs_fp32"]["bf16"]["latent_max_abs"] < 1  # bf16 changes outputs a bit
    mb = res["mfu_batches"]  # MFU at a larger batch, fp32 and bf16: 4x the FLOPs of batch 2
    assert [(r["batch"], r["precision"]) for r in mb] == [(8, "fp32"), (8, "bf16")]
    assert mb[0]["flops_per_step"] == pytest.approx(4 * v["flops_per_step"], rel=0.02) and 0 < mb[0]["mfu"] < 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert "| tiny | fp32 | 8 |" in saved["markdown"]
    assert saved["vs_timm"][0]["size"] == "tiny" and "| tiny | fp32 |" in saved["markdown"]
