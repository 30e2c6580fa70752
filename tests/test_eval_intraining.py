"""In-training evaluation equals offline evaluation on the saved checkpoint (issue 14, item 3): the encoder's val
PSNR + retrieval, and RAE's gFID of K samples — also equal to `make eval-all`'s gFID piece on that checkpoint."""

from pathlib import Path

import pytest

from encoder.export import write_random_export
from encoder.train import train
from eval import eval_all, inception
from eval.intraining import encoder_checkpoint_eval, rae_checkpoint_gfid
from ov3common.config import load_config
from ov3common.dist import init_distributed
from ov3common.log import read_jsonl
from rae_generation.cache_latents import build_cache
from rae_generation.config import CacheConfig, RAETrainConfig
from rae_generation.testing import make_image_folder
from rae_generation.train import train as train_rae
from tests.test_encoder_train import cfg_for, stages, toy_root  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def weights(request) -> Path:
    path = Path(request.config.cache.mkdir("eval_inception")) / "inception.pth"
    if not path.is_file() or not inception.weights_note(path).get("check", {}).get("passed"):
        inception.build_fid_weights(path, n_check=2)
    return path


def test_encoder_in_training_eval_equals_checkpoint_eval(toy_root, tmp_path):  # noqa: F811
    out = tmp_path / "enc"
    train(cfg_for(toy_root, out, stages((16, 4, 8)), "train.eval_every=2", "train.ckpt_every=2",
                  "train.keep_last=5", "export_dir=none", "data.val_size=12"))
    live = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step") == 2 and "val/psnr" in r]
    assert len(live) == 1, "one in-training evaluation at step 2"
    offline = encoder_checkpoint_eval(out, "step_00000002")
    assert offline["step"] == 2
    for k in ("val/psnr", "val/r1_i2t", "val/latent_l1", "val/n"):
        assert offline[k] == live[0][k], k  # the same function on the same weights and batches: exactly equal
    print(f"encoder step 2: in-training {[live[0][k] for k in ('val/psnr', 'val/r1_i2t')]} "
          f"offline {[offline[k] for k in ('val/psnr', 'val/r1_i2t')]}")
    final = encoder_checkpoint_eval(out)  # latest = step 4: the trainer's own final evaluation
    summary = [r for r in read_jsonl(out / "metrics.jsonl") if "psnr_gain_db" in r][0]
    assert final["step"] == 4 and final["val/psnr"] == summary["val/psnr"]


def test_rae_in_training_gfid_equals_checkpoint_and_eval_all(weights, tmp_path):
    enc = write_random_export(tmp_path / "export", size="tiny", image_size=32)
    imgs = make_image_folder(tmp_path / "imgs", num_classes=3, per_class=4, size=32)
    lat = build_cache(load_config(CacheConfig, None, [f"source={imgs}", f"encoder={enc}", f"out_dir={tmp_path / 'lat'}",
                                                      "image_size=32", "num_workers=0", "device=cpu"]))
    cache = tmp_path / "fid_cache"
    cfg = load_config(RAETrainConfig, "configs/rae/toy.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.latents={lat}", "model.size=tiny", "train.batch_size=6",
        "train.steps=4", "train.ckpt_every=2", "train.keep_last=5", "train.device=cpu", "train.preview=false",
        "sample.steps=2", "eval.every=2", f"eval.real={imgs}", f"eval.weights={weights}", "eval.per_class=1",
        f"eval.cache_dir={cache}", "train.compile=false"])
    run = train_rae(cfg, init_distributed("cpu"))
    live = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "eval/gfid" in r}
    assert sorted(live) == [2, 4] and live[2]["eval/gfid_n"] == 3
    assert live[2]["eval/gfid"] != live[4]["eval/gfid"]  # the model moved
    offline = rae_checkpoint_gfid(run, "step_00000002")
    assert offline["gfid"] == live[2]["eval/gfid"] and offline["n"] == 3
    print(f"RAE step 2: in-training gFID {live[2]['eval/gfid']} offline {offline['gfid']}")
    ev = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={tmp_path / 'report'}", "pieces=[gfid]", "device=cpu", f"fid.weights={weights}",
        f"fid.cache_dir={cache}", "fid.bootstrap=0", f"gfid.real={imgs}", "gfid.real_per_class=0",
        "gfid.per_class=1", "gfid.seed=0", f"rows=[{{name: r, rae: {run}}}]"])
    row = eval_all.evaluate(ev)["rows"][0]
    assert row["results"]["gfid"]["gfid"] == live[4]["eval/gfid"]  # make eval-all on the latest checkpoint
    print(f"RAE step 4: in-training gFID {live[4]['eval/gfid']} eval-all {row['results']['gfid']['gfid']}")
    assert row["results"]["gfid"]["manifest"]["checkpoint"].endswith("step_00000004/ema.safetensors")
