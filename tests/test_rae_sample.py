"""Sampling API used by the eval harness, the ADM npz layout, the labelled grid and AutoGuidance via the CLI."""

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from encoder.export import write_random_export
from eval.toygen import toy_metrics
from ov3common.checkpoint import CheckpointManager
from ov3common.config import load_config
from ov3common.dist import init_distributed
from rae_generation import classify as classify_mod
from rae_generation.cache_latents import build_cache
from rae_generation.classify import factor_accuracy
from rae_generation.classify import main as classify
from rae_generation.config import CacheConfig, RAETrainConfig
from rae_generation.manifest import export_sha256, manifest_path, read_manifest
from rae_generation.sample import load_generator, main, write_npz
from rae_generation.testing import make_image_folder
from rae_generation.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (3 classes, 32 px, random tiny encoder) with checkpoints at steps 4 and 8."""

    root = tmp_path_factory.mktemp("rae_sample")
    enc = write_random_export(root / "export", size="tiny", image_size=32)
    imgs = make_image_folder(root / "imgs", num_classes=3, per_class=8, size=32)
    lat = build_cache(load_config(CacheConfig, None, [f"source={imgs}", f"encoder={enc}", f"out_dir={root / 'lat'}",
                                                      "image_size=32", "num_workers=0", "device=cpu"]))
    cfg = load_config(RAETrainConfig, "configs/rae/toy.yaml", [
        f"out_dir={root / 'run'}", f"data.latents={lat}", "model.size=tiny", "train.batch_size=8", "train.steps=8",
        "train.ckpt_every=4", "train.keep_last=5", "train.device=cpu", "train.preview=true", "sample.steps=3",
        "train.compile=false"])
    return train(cfg, init_distributed("cpu"))


def test_load_generator_api(run):
    gen = load_generator(run, device="cpu")
    assert gen.num_classes == 3 and gen.class_names == ["class_00", "class_01", "class_02"]
    labels = torch.tensor([0, 1, 2, 1])
    imgs = gen.sample(labels, steps=3, cfg_scale=1.5, seed=3)
    assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.float32
    assert imgs.min() >= -1 and imgs.max() <= 1
    torch.testing.assert_close(gen.sample(labels, steps=3, cfg_scale=1.5, seed=3), imgs)  # deterministic
    part = gen.sample_latents(labels[2:], steps=3, seed=3, offset=2, batch_size=1)
    torch.testing.assert_close(part, gen.sample_latents(labels, steps=3, seed=3)[2:])  # batch-independent noise
    heun = gen.sample_latents(labels, steps=3, seed=3, method="heun")
    assert not torch.allclose(heun, gen.sample_latents(labels, steps=3, seed=3))
    with pytest.raises(ValueError, match="labels must be in"):
        gen.sample(torch.tensor([3]), steps=2)
    assert (run / "preview.png").is_file()


def test_sample_cli_writes_adm_npz_and_grid(run, tmp_path):
    out = tmp_path / "s" / "samples.npz"
    main([f"run={run}", f"out={out}", "per_class=3", "guidance.steps=2", "guidance.cfg_scale=2.0", "device=cpu",
          "batch_size=4"])
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        arr, lab = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (9, 32, 32, 3)
    assert lab.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (tmp_path / "s" / "samples_grid.png").is_file() and (tmp_path / "s" / "samples_info.json").is_file()

    m = read_manifest(out)  # the manifest beside the npz, checked against the file's sha256
    ckpt = CheckpointManager(run / "checkpoints").latest()
    assert m["checkpoint"] == f"{ckpt}/ema.safetensors" and len(m["checkpoint_sha256"]) == 64
    assert (m["weights"], m["sampler"], m["steps"], m["cfg_scale"], m["cfg_interval"]) == ("ema", "euler", 2, 2.0, [0, 1])
    assert (m["guidance"], m["per_class"], m["num_samples"], m["class_balance"], m["seed"]) == ("cfg", 3, 9, "balanced", 0)
    assert m["precision"] == "fp32" and m["encoder_sha256"] == export_sha256(run.parent / "export")
    assert m["decoder"] == {"tau": 0.0, "image_size": 32, "dtype": "float32"} and m["npz_rows"] == 9


def test_autoguidance_with_an_earlier_checkpoint(run, tmp_path):
    out = tmp_path / "ag.npz"
    main([f"run={run}", f"guide_run={run}", "guide_checkpoint=step_00000004", f"out={out}", "per_class=1",
          "guidance.steps=2", "guidance.cfg_scale=1.5", "device=cpu"])
    early = load_generator(run, checkpoint="step_00000004", load_encoder=False)
    gen = load_generator(run, guide=early, load_encoder=False)
    plain = load_generator(run, load_encoder=False)
    y = torch.tensor([0, 2])
    assert not torch.allclose(gen.sample_latents(y, steps=2, cfg_scale=1.5), plain.sample_latents(y, steps=2,
                                                                                                  cfg_scale=1.5))
    torch.testing.assert_close(gen.sample_latents(y, steps=2, cfg_scale=1.0), plain.sample_latents(y, steps=2))
    with np.load(out) as f:
        assert f["arr_0"].shape == (3, 32, 32, 3)

    m = json.loads(manifest_path(out).read_text())
    assert m["guidance"] == "autoguidance" and len(m["guide_checkpoint_sha256"]) == 64


def test_npz_layout_is_checked(tmp_path):
    write_npz(tmp_path / "a.npz", torch.zeros(2, 3, 8, 8), torch.tensor([1, 0]))
    with np.load(tmp_path / "a.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3) and f["arr_0"][0, 0, 0, 0] == 128 and f["arr_1"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="npz"):
        write_npz(tmp_path / "b.npz", torch.zeros(2, 3, 8, 8), torch.tensor([1]))


def test_class_accuracy_of_samples_pixels_and_tokens(run, tmp_path):
    root = run.parent
    out = tmp_path / "samples.npz"
    main([f"run={run}", f"out={out}", "per_class=2", "guidance.steps=2", "device=cpu", "save_tokens=true"])
    res = classify([f"train={root / 'imgs'}", f"val={root / 'imgs'}", f"latents={root / 'lat'}",
                    f"encoder={root / 'export'}", f"npz={out}", f"out_dir={tmp_path / 'clf'}",
                    f"pixel_dir={tmp_path / 'clf'}", "image_size=32",
                    "epochs=8", "token_epochs=2", "batch_size=8", "lr=3e-3"])
    assert res["pixels"]["val_accuracy_real"] > 0.9  # 3 colours: an easy task for the pixel CNN
    assert 0 <= res["pixels"]["val_accuracy_reconstructed"] <= 1 and 0 <= res["pixels"]["sample_accuracy"] <= 1
    assert 0 <= res["tokens"]["sample_accuracy"] <= 1 and res["num_samples"] == 6
    assert (tmp_path / "samples_class_accuracy.json").is_file()
    # eval-all's toygen piece: toy FID + class accuracy with intervals, in the features of that pixel classifier

    t = toy_metrics(tmp_path / "clf", out, root / "imgs", image_size=32, n_boot=20)
    assert t["n"] == 6 and t["toy_fid"] >= 0 and t["toy_fid_interval"]["n"] == 6
    assert abs(t["class_acc"] - res["pixels"]["sample_accuracy"]) < 1e-6  # float32 mean vs k / n
    assert t["class_acc_interval"]["low"] <= t["class_acc"] <= t["class_acc_interval"]["high"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pixel_classifier_alone_in_either_precision(run, tmp_path, monkeypatch, precision):
    """make demo's pixel-classifier job: no encoder, latents or samples — only the shared pixel CNN is trained;
    precision=bf16 runs its training steps under bf16 autocast (the weights stay fp32) and still learns the task."""
    seen = []

    class Recording(classify_mod.ToyClassifier):
        def embed(self, x):
            f = super().embed(x)
            if self.training:
                seen.append(f.dtype)
            return f

    monkeypatch.setattr(classify_mod, "ToyClassifier", Recording)
    root = run.parent
    res = classify([f"train={root / 'imgs'}", f"val={root / 'imgs'}", "encoder=", "latents=", "npz=",
                    f"out_dir={tmp_path / 'row'}", f"pixel_dir={tmp_path / 'pix'}", "image_size=32", "epochs=8",
                    "batch_size=8", "lr=3e-3", f"precision={precision}"])
    assert res["pixels"]["val_accuracy_real"] > 0.9 and set(res) == {"pixels"}
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert (tmp_path / "pix" / "pixels.safetensors").is_file() and not (tmp_path / "row").exists()
    w = classify_mod.load_safetensors(tmp_path / "pix" / "pixels.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values() if t.is_floating_point())


def test_factor_accuracy_counts_each_part():
    classes = ["red_circle", "red_star", "blue_circle", "blue_star"]
    pred, labels = torch.tensor([0, 1, 3, 2]), torch.tensor([0, 0, 1, 3])
    assert factor_accuracy(pred, labels, classes, ["colour", "shape"]) == {"colour": 0.75, "shape": 0.5}
    assert factor_accuracy(pred, labels, classes, []) == {}
    with pytest.raises(ValueError, match="a_b"):
        factor_accuracy(pred, labels, ["red", "blue", "x", "y"], ["colour", "shape"])



def test_two_rows_classifying_at_once_train_the_shared_pixel_classifier_once(tmp_path, monkeypatch):
    """make demo's lanes may run two rows' rae-classacc together: one trains pixel_dir's CNN, the other loads it."""
    trained = []

    def slow_fit(model, *args, **kwargs):
        trained.append(1)
        time.sleep(0.5)  # the other row asks meanwhile
        return model

    x, y = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    monkeypatch.setattr(classify_mod, "fit", slow_fit)
    monkeypatch.setattr(classify_mod, "load_folder", lambda *a: (x, y, ["a_b", "c_d"]))
    cfg = SimpleNamespace(pixel_dir=str(tmp_path / "shared"), retrain=False, train="t", val="v", image_size=8,
                          epochs=1, encoder="", factors=[])
    got = []
    rows = [threading.Thread(target=lambda o: got.append(classify_mod.pixel_classifier(cfg, o)),
                             args=(tmp_path / f"row{i}",)) for i in range(2)]
    for t in rows:
        t.start()
    for t in rows:
        t.join()
    assert len(trained) == 1 and len(got) == 2
    a, b = (m.state_dict() for m, _ in got)
    assert all(torch.equal(a[k], b[k]) for k in a)
