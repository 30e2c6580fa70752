"""`make eval-all` end to end on a miniature toy world: present pieces are scored, absent ones shown as '—'."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import eval_all, inception, report

PALETTE = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


def fake_sampler(run_dir: str, device: str, **options):
    """gfid.sampler interface: (generate(labels) -> images in [-1, 1], class names)."""
    def generate(labels):
        base = PALETTE[labels % 4][:, :, None, None].expand(-1, -1, 32, 32)
        return (0.8 * base + 0.1 * torch.randn(len(labels), 3, 32, 32)).clamp(-1, 1)

    return generate, ["c0", "c1", "c2", "c3"]


def fake_predictor(run_dir: str, device: str, **options):
    """llava.predictor interface: predict(records) -> raw answers (always 'A' here)."""
    assert Path(run_dir).is_dir()
    return lambda records: ["A" for _ in records]


def fake_ranker(run_dir: str, device: str, **options):
    """llava.ranker interface: predict(records) -> letters (always 'B' here)."""
    assert Path(run_dir).is_dir() and "max_new_tokens" not in options
    return lambda records: ["B" for _ in records]


def _img(path: Path, color, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size, size, 3), color, np.uint8)
    a[8:20, 10:24] = 255 - np.asarray(color, np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("eval_all")
    data = root / "data"
    (data / "meta.json").parent.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"image_root": "images"}))
    for i in range(4):
        _img(data / "images" / "test" / f"{i}.jpg", (40 * i, 90, 30))
        _img(data / "images" / "val" / f"{i}.jpg", (30, 40 * i, 90))
        _img(data / "classes" / "val" / f"c{i}" / "0.png", (PALETTE[i].numpy() * 100 + 120).astype(int).tolist())
    pope = [dict(question_id=str(k), question="Is there a cube in the image?", answer="yes" if k % 2 else "no",
                 image=f"test/{k % 4}.jpg", category=c) for k, c in enumerate(["random", "popular", "adversarial"] * 2)]
    (data / "pope").mkdir()
    (data / "pope" / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pope))
    seed = [dict(question_id=str(k), question="What colour?", choice_a="red", choice_b="green", choice_c="blue",
                 choice_d="cyan", answer="AB"[k % 2], image=f"test/{k}.jpg", category="attribute",
                 data_type="image") for k in range(4)]
    (data / "seedbench").mkdir()
    (data / "seedbench" / "seedbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed))
    runs = root / "runs"
    from encoder.export import write_random_export

    write_random_export(runs / "enc" / "export", image_size=64)
    with open(runs / "enc" / "metrics.jsonl", "w") as f:
        for s in range(5):
            f.write(json.dumps({"step": s, "loss": 2.0 / (s + 1), "contrastive": 1.0 - 0.1 * s, "lr": 1e-3}) + "\n")
    (runs / "llava" / "stage2").mkdir(parents=True)
    (runs / "llava" / "stage2" / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 3.0}) + "\n")
    preds = [dict(question_id=r["question_id"], answer=r["answer"], category=r["category"],
                  prediction="Yes" if k % 3 else "No.") for k, r in enumerate(pope)]
    (runs / "llava" / "pope_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    gen, _ = fake_sampler("", "cpu")
    x = gen(torch.arange(4))
    (runs / "rae" / "samples").mkdir(parents=True)
    np.savez(runs / "rae" / "samples" / "samples.npz", arr_0=((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(),
             arr_1=np.arange(4))
    (runs / "rae_b").mkdir()
    weights = Path(request.config.cache.mkdir("eval_inception")) / "inception.pth"
    if not weights.is_file() or not inception.weights_note(weights).get("check", {}).get("passed"):
        inception.build_fid_weights(weights, n_check=2)
    return root, weights


@pytest.mark.slow
def test_eval_all_on_a_miniature_toy_world(world):
    from ov3common.config import load_config

    root, weights = world
    d, r = root / "data", root / "runs"
    cfg = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={root / 'reports'}", "device=cpu", f"fid.weights={weights}", f"fid.cache_dir={root / 'cache'}",
        "fid.kid_subsets=2", "lpips.backbone=random",
        f"pope.path={d / 'pope' / 'pope.jsonl'}", f"seedbench.path={d / 'seedbench' / 'seedbench.jsonl'}",
        f"rfid.images={d / 'images' / 'val'}", f"gfid.real={d / 'classes' / 'val'}", "gfid.per_class=1",
        "llava.predictor=tests.test_eval_all:fake_predictor", "llava.ranker=tests.test_eval_all:fake_ranker",
        "gfid.sampler=tests.test_eval_all:fake_sampler",
        f"rows=[{{name: OV3, encoder: {r / 'enc' / 'export'}, encoder_run: {r / 'enc'}, llava: {r / 'llava'},"
        f" rae: {r / 'rae'}}}, {{name: baseline, encoder: {r / 'nope'}, rae: {r / 'rae_b'}}}]",
    ])
    s = eval_all.evaluate(cfg)
    ov3, base = s["rows"]
    assert set(ov3["results"]) == {"seedbench", "seedbench_rank", "pope", "gfid", "rfid"} and not ov3["errors"]
    assert ov3["results"]["seedbench"]["image"] == 0.5  # the fake predictor always answers 'A'
    assert ov3["results"]["seedbench_rank"]["image"] == 0.5  # the fake ranker always answers 'B'
    assert ov3["results"]["pope"]["overall"]["n"] == 6 and ov3["results"]["gfid"]["n"] == 4
    assert ov3["results"]["rfid"]["n"] == 4 and ov3["results"]["rfid"]["rfid"] > 0
    assert ov3["results"]["rfid"]["lpips_random_backbone"] and ov3["results"]["rfid"]["lpips"] > 0
    # baseline: no encoder, no LLaVA run -> '—' with reasons; gFID through the sampler interface
    assert "no encoder export" in base["missing"]["rfid"] and "no LLaVA run" in base["missing"]["pope"]
    assert base["results"]["gfid"]["n"] == 4 and not base["errors"]
    out = root / "reports"
    js = json.loads((out / "summary.json").read_text())
    assert js["toy"] and js["rows"][0]["name"] == "OV3"
    md = (out / "summary.md").read_text()
    assert ("| Encoder | SeedBench (img) | SeedBench rank | POPE F1 | POPE acc | gFID | rFID | PSNR | SSIM | LPIPS |"
            in md)
    assert report.TOY_DISCLAIMER in md and "| baseline | —[1] | —[2] | —[3] | —[3] |" in md
    assert "- [4] baseline / rfid: no encoder export" in md
    assert " †" in md and "random backbone: not a real perceptual score" in md
    for f in ("curves_encoder.png", "curves_llava.png", "ov3/rfid/recon_grid.png", "ov3/gfid/samples_grid.png",
              "baseline/gfid/samples_grid.png"):
        assert f in js["figures"] and (out / f).is_file()
    assert (out / "ov3" / "seedbench_predictions.jsonl").is_file()
    assert (out / "ov3" / "seedbench_rank_predictions.jsonl").is_file()


def test_row_cells_and_errors():
    row = {"name": "x", "results": {"rfid": {"rfid": 1.234, "psnr": 20.0, "ssim": 0.5, "lpips": 0.25,
                                             "lpips_random_backbone": True}},
           "missing": {"pope": "no LLaVA run"}, "errors": {"gfid": "error: RuntimeError: boom"}}
    cells, notes = report.row_cells(row, first_note=4)
    assert cells == ["x", "—[4]", "—[5]", "—[6]", "—[6]", "—[7]", "1.23", "20.00", "0.500", "0.250 †"]
    assert notes == [("seedbench", "not available"), ("seedbench_rank", "not available"), ("pope", "no LLaVA run"),
                     ("gfid", "error: RuntimeError: boom")]
    md = report.render_markdown({"rows": [row], "toy": False})
    assert "random backbone: not a real perceptual score" in md and report.TOY_DISCLAIMER not in md


def test_config_errors(tmp_path, capsys):
    assert eval_all.main(["--config", "configs/eval/toy.yaml", f"pope.path={tmp_path / 'missing.jsonl'}"]) == 2
    assert "pope.path" in capsys.readouterr().err
    assert eval_all.main(["--config", "configs/eval/toy.yaml", "nosuchkey=1"]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_unavailable_predictor_and_sampler_are_missing_not_errors(tmp_path):
    from ov3common.config import load_config

    (tmp_path / "llava").mkdir()
    (tmp_path / "rae").mkdir()
    (tmp_path / "pope.jsonl").write_text(json.dumps(dict(question_id="1", question="q?", answer="yes",
                                                         image="x.jpg", category="random")) + "\n")
    cfg = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={tmp_path / 'r'}", "pieces=[pope, gfid]", f"pope.path={tmp_path / 'pope.jsonl'}",
        f"fid.weights={tmp_path / 'w.pth'}", "llava.predictor=no_such_module:predictor",
        "gfid.sampler=no_such_module:sampler",
        f"rows=[{{name: x, llava: {tmp_path / 'llava'}, rae: {tmp_path / 'rae'}}}]"])
    (tmp_path / "w.pth").write_bytes(b"")
    row = eval_all.evaluate(cfg)["rows"][0]
    assert "no_such_module" in row["missing"]["pope"] and "no_such_module" in row["missing"]["gfid"]
    assert not row["errors"]
