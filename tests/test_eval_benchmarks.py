"""Benchmark loaders: toy JSONL + image folder, parquet and save_to_disk (arrow) layouts, prompts, errors."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval import score
from eval.benchmarks import (
    BenchmarkError,
    load_image,
    load_pope,
    load_seedbench,
    pope_prompt,
    seed_prompt,
    write_predictions,
)


def _png(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


POPE_ROWS = [
    dict(question_id=i, question=f"Is there a {o} in the image? ", answer=a, category=c, image_idx=k)
    for i, (o, a, c, k) in enumerate([
        ("cat", "yes", "random", 0), ("dog", "no", "random", 0), ("cat", "yes", "popular", 1),
        ("car", "No", "popular", 1), ("cup", "yes", "adversarial", 0), ("bus", "no", "adversarial", 1),
    ])
]
SEED_ROWS = [
    dict(question_id=f"q{i}", question=f"How many {i}?", choice_a="one", choice_b="two", choice_c="three",
         choice_d="four", answer="ABCD"[i % 4], data_type=dt, question_type_id=qt)
    for i, (dt, qt) in enumerate([("image", 5), ("image", 1), ("video", 10), ("image", 5)])
]


@pytest.fixture()
def toy_world(tmp_path):
    """A toy-world-like layout: meta.json with image_root, images/, pope/pope.jsonl, seedbench/seedbench.jsonl."""
    (tmp_path / "images" / "test").mkdir(parents=True)
    for k in range(2):
        (tmp_path / "images" / "test" / f"{k}.jpg").write_bytes(_png(60 * k))
    (tmp_path / "meta.json").write_text(json.dumps({"image_root": "images"}))
    (tmp_path / "pope").mkdir()
    rows = [{**{k: v for k, v in r.items() if k != "image_idx"}, "image": f"test/{r['image_idx']}.jpg"}
            for r in POPE_ROWS]
    (tmp_path / "pope" / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seedbench").mkdir()
    srows = [{**r, "image": "test/0.jpg", "category": "counting"} for r in SEED_ROWS if r["data_type"] == "image"]
    (tmp_path / "seedbench" / "seedbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in srows))
    return tmp_path


def _pope_table():
    imgs = [{"bytes": _png(10), "path": None}, {"bytes": _png(200), "path": None}]
    rows = [{**{k: v for k, v in r.items() if k != "image_idx"}, "image": imgs[r["image_idx"]]} for r in POPE_ROWS]
    return pa.Table.from_pylist(rows)


def _seed_table():
    rows = [{**r, "image": [{"bytes": _png(30 * i), "path": None}] * (3 if r["data_type"] == "video" else 1)}
            for i, r in enumerate(SEED_ROWS)]
    return pa.Table.from_pylist(rows)


def test_prompts_match_llava15():
    assert pope_prompt(" Is there a cat in the image? ") == (
        "Is there a cat in the image?\nAnswer the question using a single word or phrase.")
    assert seed_prompt("Q?", ["w", "x", "y", "z"]) == (
        "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer with the option's letter from the given choices directly.")


def test_toy_jsonl_layout(toy_world):
    recs = load_pope(toy_world / "pope" / "pope.jsonl")
    assert len(recs) == 6 and recs[3]["answer"] == "no"
    assert recs[0]["image"] == str(toy_world / "images" / "test" / "0.jpg")
    assert recs[0]["prompt"].endswith("single word or phrase.") and recs[0]["question_id"] == "0"
    assert load_image(recs[1]["image"]).size == (16, 16)
    assert len(load_pope(toy_world / "pope" / "pope.jsonl", categories=["random"])) == 2
    assert len(load_pope(toy_world / "pope" / "pope.jsonl", limit_per_category=1)) == 3
    seeds = load_seedbench(toy_world / "seedbench" / "seedbench.jsonl")
    assert [r["category"] for r in seeds] == ["counting"] * 3
    assert seeds[0]["choices"]["B"] == "two" and "\nD. four\n" in seeds[0]["prompt"]


def test_parquet_layouts(tmp_path):
    (tmp_path / "pope" / "data").mkdir(parents=True)
    pq.write_table(_pope_table(), tmp_path / "pope" / "data" / "test-00000-of-00001.parquet")
    pq.write_table(_pope_table().slice(0, 1), tmp_path / "pope" / "data" / "train-00000-of-00001.parquet")
    recs = load_pope(tmp_path / "pope")  # the folder; the test split is preferred
    assert len(recs) == 6
    assert isinstance(recs[0]["image"], Image.Image) and load_image(recs[0]["image"]).getpixel((0, 0)) == (10,) * 3
    assert recs[0]["image"] is not recs[1]["image"]  # opened per record ...
    pq.write_table(_seed_table(), tmp_path / "seed.parquet")
    img_only = load_seedbench(tmp_path / "seed.parquet")
    assert [r["question_id"] for r in img_only] == ["q0", "q1", "q3"]
    assert img_only[0]["category"] == "instances_counting" and img_only[1]["category"] == "scene_understanding"
    every = load_seedbench(tmp_path / "seed.parquet", data_type=None)
    assert len(every) == 4 and len(every[2]["images"]) == 3 and every[2]["data_type"] == "video"


def test_save_to_disk_layout(tmp_path):
    """An HF DatasetDict.save_to_disk folder: dataset_dict.json + <split>/state.json + arrow stream files."""
    d = tmp_path / "POPE"
    (d / "test").mkdir(parents=True)
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    table = _pope_table()
    with pa.OSFile(str(d / "test" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (d / "test" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    recs = load_pope(d)
    assert len(recs) == 6 and {r["category"] for r in recs} == {"random", "popular", "adversarial"}
    assert load_image(recs[-1]["image"]).getpixel((3, 3)) == (200,) * 3
    with pytest.raises(BenchmarkError, match="no split 'validation'"):
        load_pope(d, split="validation")


def test_loader_errors(tmp_path, toy_world):
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_pope(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "question": "q", "answer": "maybe", "image": "x.jpg",
                               "category": "random"}) + "\n")
    with pytest.raises(BenchmarkError, match="yes/no"):
        load_pope(bad)
    bad.write_text(json.dumps({"question_id": 1, "question": "q"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:1: missing key"):
        load_pope(bad)
    bad.write_text(json.dumps({"question_id": 1, "question": "q", "answer": "yes", "image": "x.jpg",
                               "category": "random"}) + "\n")
    with pytest.raises(BenchmarkError, match="image file does not exist"):
        load_pope(bad)
    pq.write_table(_pope_table().drop_columns(["category"]), tmp_path / "p.parquet")
    with pytest.raises(BenchmarkError, match=r"missing column\(s\) \['category'\]"):
        load_pope(tmp_path / "p.parquet")
    with pytest.raises(BenchmarkError, match="cannot decode"):
        load_image(b"not an image")
    assert load_image(_png(5)).mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGBA", (9, 9), (255, 0, 0, 0)).save(buf, "PNG")  # transparent -> composited on white
    rgba = load_image(Image.open(io.BytesIO(buf.getvalue())))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_write_predictions_roundtrip_with_scorer(toy_world, tmp_path):
    recs = load_pope(toy_world / "pope" / "pope.jsonl")
    preds = ["Yes", "No", "yes", "no.", "", "garbage"]
    out = write_predictions(recs, preds, tmp_path / "p.jsonl")
    r = score.score_file("pope", out, "llava")
    assert r["overall"]["n"] == 6 and r["overall"]["accuracy"] == pytest.approx(5 / 6)
    seeds = load_seedbench(toy_world / "seedbench" / "seedbench.jsonl")
    out = write_predictions(seeds, ["A", "B. two", "x"], tmp_path / "s.jsonl")
    assert score.score_file("seedbench", out)["image"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        write_predictions(recs, preds[:2], tmp_path / "x.jsonl")
