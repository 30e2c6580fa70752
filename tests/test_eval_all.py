"""`make eval-all` end to end on a miniature toy world: present pieces are scored, absent ones shown as '—'."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.export import write_random_export
from eval import eval_all, fid, inception, report
from ov3common.checkpoint import save_safetensors
from ov3common.config import ConfigError, load_config
from rae_generation.classify import ToyClassifier
from rae_generation.manifest import write_manifest

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

    write_random_export(runs / "enc" / "export", image_size=64)
    with open(runs / "enc" / "metrics.jsonl", "w") as f:
        for s in range(5):
            f.write(json.dumps({"step": s, "loss": 2.0 / (s + 1), "contrastive": 1.0 - 0.1 * s, "lr": 1e-3}) + "\n")
    (runs / "llava" / "stage2").mkdir(parents=True)
    (runs / "llava" / "stage2" / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 3.0}) + "\n")
    preds = [dict(question_id=r["question_id"], answer=r["answer"], category=r["category"],
                  prediction="Yes" if k % 3 else "No.") for k, r in enumerate(pope)]
    (runs / "llava" / "pope_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    blind = [dict(question_id=r["question_id"], answer=r["answer"], category=r["category"], prediction="C")
             for r in seed]  # the blind control (blank images): always 'C', never right here
    (runs / "llava" / "seedbench_blind_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in blind))
    gen, _ = fake_sampler("", "cpu")
    x = gen(torch.arange(4))
    (runs / "rae" / "samples").mkdir(parents=True)
    np.savez(runs / "rae" / "samples" / "samples.npz", arr_0=((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(),
             arr_1=np.arange(4))

    save_safetensors(runs / "clf" / "pixels.safetensors", ToyClassifier(4).state_dict())  # make rae-classacc's
    (runs / "clf" / "pixels.json").write_text(json.dumps({"classes": ["c0", "c1", "c2", "c3"]}))
    (runs / "rae_b").mkdir()
    weights = Path(request.config.cache.mkdir("eval_inception")) / "inception.pth"
    if not weights.is_file() or not inception.weights_note(weights).get("check", {}).get("passed"):
        inception.build_fid_weights(weights, n_check=2)
    return root, weights


@pytest.mark.slow
def _world_cfg(world, out: str = "reports", *extra: str):
    root, weights = world
    d, r = root / "data", root / "runs"
    return load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={root / out}", "device=cpu", f"fid.weights={weights}", f"fid.cache_dir={root / 'cache'}",
        "fid.kid_subsets=2", "fid.bootstrap=20", "lpips.backbone=random", "rfid.max_images=4",
        f"pope.path={d / 'pope' / 'pope.jsonl'}", f"seedbench.path={d / 'seedbench' / 'seedbench.jsonl'}",
        f"rfid.images={d / 'images' / 'val'}", f"gfid.real={d / 'classes' / 'val'}", "gfid.per_class=1",
        "llava.predictor=tests.test_eval_all:fake_predictor", "llava.ranker=tests.test_eval_all:fake_ranker",
        "gfid.sampler=tests.test_eval_all:fake_sampler", f"toygen.classifier={r / 'clf'}", "toygen.image_size=32",
        "toygen.bootstrap=20",
        f"rows=[{{name: OV3, encoder: {r / 'enc' / 'export'}, encoder_run: {r / 'enc'}, llava: {r / 'llava'},"
        f" rae: {r / 'rae'}}}, {{name: baseline, encoder: {r / 'nope'}, rae: {r / 'rae_b'}}}]", *extra,
    ])


def test_eval_all_on_a_miniature_toy_world(world):
    root, _ = world
    s = eval_all.evaluate(_world_cfg(world))
    ov3, base = s["rows"]
    assert set(ov3["results"]) == {"seedbench", "seedbench_blind", "seedbench_rank", "pope", "gfid", "toygen",
                                   "rfid"} and not ov3["errors"]
    assert ov3["results"]["seedbench"]["image"] == 0.5  # the fake predictor always answers 'A'
    assert ov3["results"]["seedbench_blind"]["image"] == 0.0  # read from the file (never predicted)
    t = ov3["results"]["toygen"]  # the 4 samples in the pixel classifier's features, against the class split
    assert t["n"] == 4 and t["num_real"] == 4 and t["toy_fid"] >= 0 and 0 <= t["class_acc"] <= 1
    assert "llava-predict" in base["missing"]["seedbench_blind"] and "rae-sample" in base["missing"]["toygen"]
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
    assert ("| Encoder | SeedBench (img) | SeedBench blind | SeedBench rank | POPE F1 | POPE acc | gFID | toy FID | "
            "class acc | rFID | PSNR | SSIM | LPIPS |" in md)
    assert report.TOY_DISCLAIMER in md and "| baseline | —[1] | —[2] | —[3] | —[4] | —[4] |" in md
    ov3_cells = md.split("| OV3 |")[1].split("\n")[0].split(" | ")
    assert all("[" in c for c in ov3_cells[:-1]), ov3_cells  # an interval on every cell (LPIPS: † last)
    assert "- [6] baseline / rfid: no encoder export" in md
    assert " †" in md and "random backbone: not a real perceptual score" in md
    for f in ("curves_encoder.png", "curves_llava.png", "ov3/rfid/recon_grid.png", "ov3/gfid/samples_grid.png",
              "baseline/gfid/samples_grid.png"):
        assert f in js["figures"] and (out / f).is_file()
    assert (out / "ov3" / "seedbench_predictions.jsonl").is_file()
    assert (out / "ov3" / "seedbench_rank_predictions.jsonl").is_file()
    # the 4-sample npz without a manifest was not scored: regenerated under the protocol, with its manifest
    g = ov3["results"]["gfid"]
    assert g["manifest"]["written_by"] == "eval.gfid" and g["manifest"]["num_samples"] == 4
    assert (out / "ov3" / "gfid" / "samples.manifest.json").is_file() and len(g["ref_stats_sha256"]) == 64
    assert g["fid_interval"]["low"] <= g["fid_interval"]["high"] and "[" in md.split("| OV3 |")[1].split("\n")[0]
    # intervals, comparisons, benchmark identities and manifests are in the report and manifest.json
    assert "## Comparisons" in md and "gFID: OV3" in md
    assert "## Benchmark files" in md and "UNKNOWN pope VARIANT" in md  # 6 rows match no known POPE variant
    man = json.loads((out / "manifest.json").read_text())
    assert man["benchmarks"]["pope"]["rows"] == 6 and len(man["benchmarks"]["pope"]["sha256"]) == 64
    assert man["rows"]["OV3"]["gfid_sampling"]["seed"] == 0 and man["inception_weights"]["sha256"]
    assert ov3["results"]["pope"]["benchmark_file"]["sha256"] == man["benchmarks"]["pope"]["sha256"]


def test_row_cells_and_errors():
    row = {"name": "x", "results": {"rfid": {"rfid": 1.234, "psnr": 20.0, "ssim": 0.5, "lpips": 0.25,
                                             "lpips_random_backbone": True}},
           "missing": {"pope": "no LLaVA run"}, "errors": {"gfid": "error: RuntimeError: boom"}}
    cells, notes = report.row_cells(row, first_note=4)
    assert cells == ["x", "—[4]", "—[5]", "—[6]", "—[7]", "—[7]", "—[8]", "—[9]", "—[9]", "1.23", "20.00", "0.500",
                     "0.250 †"]
    assert notes == [("seedbench", "not available"), ("seedbench_blind", "not available"),
                     ("seedbench_rank", "not available"), ("pope", "no LLaVA run"),
                     ("gfid", "error: RuntimeError: boom"), ("toygen", "not available")]
    iv = {"value": 20.0, "low": 19.5, "high": 20.4, "method": "bootstrap", "n": 8}  # every cell with an interval
    row["results"]["rfid"]["intervals"] = {"psnr": iv}
    assert report.row_cells(row)[0][10] == "20.00 [19.50, 20.40]"
    md = report.render_markdown({"rows": [row], "toy": False})
    assert "random backbone: not a real perceptual score" in md and report.TOY_DISCLAIMER not in md


def test_config_errors(tmp_path, capsys):
    assert eval_all.main(["--config", "configs/eval/toy.yaml", f"pope.path={tmp_path / 'missing.jsonl'}"]) == 2
    assert "pope.path" in capsys.readouterr().err
    assert eval_all.main(["--config", "configs/eval/toy.yaml", "nosuchkey=1"]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_unavailable_predictor_and_sampler_are_missing_not_errors(tmp_path):
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


def _npz(path: Path, n: int, manifest: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gen, _ = fake_sampler("", "cpu")
    labels = torch.arange(n) % 4
    x = gen(labels)
    np.savez(path, arr_0=((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())
    if manifest is not None:
        write_manifest(path, manifest)
    return path


def test_gfid_refuses_too_few_samples_or_a_wrong_manifest(tmp_path):
    """No sampler for the run (no generator.json): a set below the protocol, without a manifest, or with a manifest
    that differs from the config is refused with the reason; with allow_partial it is scored and marked."""

    real = tmp_path / "classes"
    for i in range(4):
        _img(real / f"c{i}" / "0.png", (40 * i, 90, 30))
    (tmp_path / "w.pth").write_bytes(b"x")
    ok = {"per_class": 2, "num_classes": 4, "num_samples": 8, "class_balance": "balanced", "seed": 0}
    cases = {"small": (4, None, "has 4 samples; the protocol asks for 8"),
             "nomanifest": (8, None, "no sampling manifest"),
             "seed": (8, {**ok, "seed": 3}, "seed 3 (protocol 0)")}
    rows = []
    for name, (n, man, _) in cases.items():
        _npz(tmp_path / name / "samples.npz", n, man)
        rows.append(f"{{name: {name}, rae: {tmp_path / name}}}")
    cfg = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={tmp_path / 'r'}", "pieces=[gfid]", f"fid.weights={tmp_path / 'w.pth'}", f"gfid.real={real}",
        "gfid.per_class=2", f"rows=[{', '.join(rows)}]"])
    out = eval_all.evaluate(cfg)
    for row, (name, (_, _, reason)) in zip(out["rows"], cases.items()):
        assert row["missing"]["gfid"].startswith("refused:") and reason in row["missing"]["gfid"], name
        assert not row["results"] and not row["errors"]
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "refused: " in md and "allow_partial" in md


@pytest.mark.slow
def test_gfid_allow_partial_scores_and_marks(tmp_path, world):
    root, weights = world
    _npz(tmp_path / "rae" / "samples.npz", 4)
    cfg = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={tmp_path / 'r'}", "pieces=[gfid]", f"fid.weights={weights}", "fid.bootstrap=20",
        f"gfid.real={root / 'data' / 'classes' / 'val'}", "gfid.per_class=2", "gfid.allow_partial=true",
        f"rows=[{{name: p, rae: {tmp_path / 'rae'}}}]"])
    row = eval_all.evaluate(cfg)["rows"][0]
    assert row["results"]["gfid"]["n"] == 4 and "protocol asks for 8" in row["results"]["gfid"]["partial"]
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "‡[5]" in md and "- [5] p / gfid: PARTIAL (not the protocol's set)" in md


def _row(name: str, fid: tuple[float, float, float], manifest: dict | None, acc: tuple[float, float, float]) -> dict:
    iv = lambda v: {"value": v[0], "low": v[1], "high": v[2], "method": "x", "n": 10}  # noqa: E731
    return {"name": name, "results": {"gfid": {"gfid": fid[0], "fid_interval": iv(fid), "manifest": manifest},
                                      "seedbench": {"image": acc[0], "intervals": {"image": iv(acc)}}}}


def test_rows_compared_by_intervals_and_refused_across_protocols():
    m = {"steps": 25, "cfg_scale": 6.0, "seed": 0, "per_class": 50}
    a = _row("A", (10.0, 9.0, 11.0), m, (0.50, 0.45, 0.55))
    b = _row("B", (10.5, 9.5, 12.0), m, (0.70, 0.66, 0.74))
    c = _row("C", (30.0, 28.0, 33.0), {**m, "steps": 50}, (0.52, 0.47, 0.57))
    comps = eval_all.compare_rows([a, b, c])
    by = {(x["b"], x["metric"]): x["verdict"] for x in comps}
    assert by["B", "gFID"] == "no measurable difference"  # different points, overlapping intervals
    assert by["B", "SeedBench (img)"] == "B better"
    assert by["C", "SeedBench (img)"] == "no measurable difference"
    assert by["C", "gFID"].startswith("not compared: sampling manifests differ in steps (25 vs 50)")
    allowed = {(x["b"], x["metric"]): x for x in eval_all.compare_rows([a, b, c], allow_mismatch=True)}
    assert allowed["C", "gFID"]["verdict"] == "A better" and "steps" in allowed["C", "gFID"]["protocol_differences"]
    md = report.render_markdown({"rows": [a, b, c], "comparisons": comps, "toy": False})
    assert "**no measurable difference**" in md and "not compared: sampling manifests differ" in md


FAST = ("pieces=[seedbench,pope]",)  # the reuse does not depend on the pieces: the fast ones


def test_a_row_evaluated_alone_is_reused_until_an_input_changes(world):
    """``only=[row]`` stores the row (no summary); a full run takes it while inputs, settings and code are unchanged,
    and recomputes it once a file of the row's runs changes."""
    root, _ = world
    out = root / "reports_rows"
    alone = eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST, "only=[ov3]"))
    assert [r["name"] for r in alone["rows"]] == ["OV3"] and not (out / "summary.json").exists()
    assert (out / "ov3" / "row.json").is_file() and not (out / "baseline").exists()
    full = eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST))
    ov3, base = full["rows"]
    assert ov3["reused"] == str(out / "ov3" / "row.json") and "reused" not in base
    assert ov3["results"] == json.loads(json.dumps(alone["rows"][0]["results"]))
    assert full["benchmarks"]["seedbench"]["sha256"] and (out / "summary.md").is_file()
    again = eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST, "pope.parser=lmms"))  # another setting
    assert "reused" not in again["rows"][0]
    preds = root / "runs" / "llava" / "pope_predictions.jsonl"
    eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST, "only=[OV3]"))
    preds.write_text(preds.read_text())  # same content, new mtime: an input changed
    assert "reused" not in eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST))["rows"][0]
    with pytest.raises(ConfigError, match="only: no row named 'ov4'"):
        eval_all.evaluate(_world_cfg(world, "reports_rows", *FAST, "only=[ov4]"))


def test_references_only_fills_the_cache_the_row_evaluations_read(world, monkeypatch):
    """make demo's early job: the real sets' Inception features (gfid reference, rfid originals at the export's
    size) are cached under the keys the gfid / rfid pieces look up, so a row evaluation then runs Inception only on
    its own samples and reconstructions."""
    root, _ = world
    cache = root / "cache_refs"
    pieces = ["pieces=[gfid,rfid]", f"fid.cache_dir={cache}"]
    assert eval_all.evaluate(_world_cfg(world, "reports_refs", *pieces, "references_only=true")) == {"rows": []}
    cached = sorted(cache.glob("*.npz"))
    assert len(cached) == 2 and not (root / "reports_refs" / "ov3").exists()  # gfid reference + rfid originals
    calls, extract = [], fid.extract
    monkeypatch.setattr(fid, "extract", lambda images, *a, **k: calls.append(len(images)) or extract(images, *a, **k))
    row = eval_all.evaluate(_world_cfg(world, "reports_refs", *pieces, "only=[ov3]"))["rows"][0]
    assert set(row["results"]) == {"gfid", "rfid"} and not row["errors"]
    assert calls == [4, 4] and sorted(cache.glob("*.npz")) == cached  # the samples, the reconstructions: no refs
    with pytest.raises(ConfigError, match="fid.cache_dir is empty"):
        eval_all.evaluate(_world_cfg(world, "reports_refs", "pieces=[gfid]", "fid.cache_dir=", "references_only=true"))
