"""The embedded toy world: determinism, every format reads back, POPE/SeedBench rules, tokenizer, poison."""

from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from ov3common.config import ConfigError
from ov3common.images import BadSample, decode_image, decode_json, decode_text
from ov3common.toyworld import CLASSES, OBJECTS, ToyConfig, generate, load_meta, render_scene
from ov3common.toyworld.__main__ import parse_args
from ov3common.toyworld.llava import SYSTEM_PROMPT
from ov3common.toyworld.poison import expected_counts, write_poisoned_llava, write_poisoned_shard
from ov3common.toyworld.questions import (
    LETTERS,
    MC_SUFFIX,
    SEED_CATEGORIES,
    SHORT_SUFFIX,
    ObjectStats,
    negatives,
)
from ov3common.toyworld.summary import main
from ov3common.toyworld.world import (
    CLASS_EXTENT,
    CLASS_JITTER,
    make_object,
    sample_scene,
    scene_rng,
    single_object_scene,
    split_seed,
)

CFG = ToyConfig.tiny()
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "toy"
    generate(str(out), CFG, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def test_scenes(toy) -> dict[str, dict]:
    """image relpath -> scene, read back from the test split's webdataset shards."""
    return {f"test/{m['key']}.jpg": m["scene"] for m in _wds_metas(toy, "test")}


def _wds_samples(root: Path, split: str) -> list[dict]:
    import webdataset as wds

    urls = sorted(glob.glob(str(root / "wds" / split / "shard-*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False))


def _wds_metas(root: Path, split: str) -> list[dict]:
    return [json.loads(s["json"]) for s in _wds_samples(root, split)]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ determinism
def test_deterministic_bytes_across_runs_and_worker_counts(toy, tmp_path):
    """A second run (a pool of 2 workers, other task sizes) writes exactly the same bytes."""
    other = tmp_path / "toy2"
    generate(str(other), ToyConfig.tiny(chunk=7), workers=2, progress=False)
    a, b = _files(toy), _files(other)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert len(a) > 300


def test_scene_and_render_are_pure_functions():
    s1, s2 = sample_scene(scene_rng(7, 3)), sample_scene(scene_rng(7, 3))
    assert s1 == s2
    assert render_scene(s1, 32).tobytes() == render_scene(s2, 32).tobytes()
    assert sample_scene(scene_rng(7, 4)) != s1


def test_rerun_cleans_stale_outputs(tmp_path):
    out = tmp_path / "t"
    generate(str(out), ToyConfig.tiny(n_train=40, shard_size=10, class_train=0, class_val=0), workers=1,
             progress=False)
    assert len(list((out / "wds" / "train").glob("*.tar"))) == 4
    generate(str(out), ToyConfig.tiny(n_train=20, shard_size=10, class_train=0, class_val=0), workers=1,
             progress=False)
    assert len(list((out / "wds" / "train").glob("*.tar"))) == 2
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 20


# ------------------------------------------------------------------------------------------------ layout
def test_layout_meta_and_done(toy):
    for rel in ("meta.json", "stats.json", ".done", "tokenizer/tokenizer.json", "llava/pretrain.json",
                "llava/instruct.json", "pope/pope.jsonl", "seedbench/seedbench.jsonl"):
        assert (toy / rel).is_file(), rel
    meta = load_meta(str(toy))
    assert meta["classes"] == sorted(meta["classes"]) and len(meta["classes"]) == 64
    assert meta["classes"] == [o.replace(" ", "_") for o in meta["objects"]]
    assert meta["resolution"] == 32 and meta["counts"]["images"] == {"train": 64, "val": 16, "test": 48}
    assert len(meta["shapes"]) == 8 and len(meta["colors"]) == 8 and len(meta["sizes"]) == 2
    assert len(set(meta["split_seeds"].values())) == len(meta["split_seeds"])
    with pytest.raises(FileNotFoundError, match="make data"):
        load_meta(str(toy / "nowhere"))


def test_webdataset_shards_read_back(toy):
    meta = load_meta(str(toy))
    for split, n in meta["counts"]["images"].items():
        samples = _wds_samples(toy, split)
        assert len(samples) == n
        assert len(glob.glob(str(toy / "wds" / split / "*.tar"))) == -(-n // CFG.shard_size)
        for s in samples:
            img = decode_image(s["jpg"])
            assert img.size == (32, 32)
            info = decode_json(s["json"])
            assert decode_text(s["txt"]) == info["caption"].strip()
            assert {"caption", "recaption", "scene", "label", "class_name"} <= set(info)
            scene = info["scene"]
            assert 1 <= len(scene["objects"]) <= 4
            cells = [(o["row"], o["col"]) for o in scene["objects"]]
            assert len(set(cells)) == len(cells)
            if len(scene["objects"]) == 1:
                assert CLASSES[info["label"]] == info["class_name"] == scene["objects"][0]["name"].replace(" ", "_")
            else:
                assert info["label"] is None
            for o in scene["objects"]:  # the recaption names every object with its size and position
                assert f"{o['size']} {o['name']} in the {o['position']}" in info["recaption"]
            assert (toy / "images" / split / f"{s['__key__']}.jpg").read_bytes() == s["jpg"]


def test_splits_are_disjoint(toy):
    keys, images, layouts = {}, {}, {}
    for split in ("train", "val", "test"):
        samples = _wds_samples(toy, split)
        keys[split] = {s["__key__"] for s in samples}
        images[split] = {s["jpg"] for s in samples}
        layouts[split] = {json.dumps(json.loads(s["json"])["scene"]["objects"]) for s in samples}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[a] & keys[b] and not images[a] & images[b] and not layouts[a] & layouts[b]
    assert len({split_seed(0, s) for s in ("train", "val", "test", "classes_train", "classes_val")}) == 5


def test_class_split_is_object_centric():
    rng = np.random.default_rng(0)
    centres, extents = [], []
    for i in range(200):
        scene = single_object_scene(rng, OBJECTS[i % len(OBJECTS)])
        (obj,) = scene["objects"]
        x0, y0, x1, y1 = obj["bbox"]
        assert obj["name"] == OBJECTS[i % len(OBJECTS)] and abs((x1 - x0) - (y1 - y0)) < 1e-3
        centres += [(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5]
        extents.append(x1 - x0)
    assert max(abs(c) for c in centres) <= CLASS_JITTER + 1e-4 and np.std(centres) > CLASS_JITTER / 4
    assert CLASS_EXTENT[0] - 1e-4 <= min(extents) and max(extents) <= CLASS_EXTENT[1] + 1e-4


def test_class_folder_split(toy):
    for split, n in (("train", CFG.class_train), ("val", CFG.class_val)):
        dirs = sorted(os.listdir(toy / "classes" / split))
        assert dirs == list(CLASSES)  # == torchvision ImageFolder's class order
        for d in dirs[:5]:
            files = sorted((toy / "classes" / split / d).glob("*.png"))
            assert len(files) == n
            img = Image.open(files[0])
            assert img.size == (32, 32) and img.mode == "RGB"
    train_pngs = {p.read_bytes() for p in (toy / "classes" / "train").rglob("*.png")}
    assert not train_pngs & {p.read_bytes() for p in (toy / "classes" / "val").rglob("*.png")}


# ------------------------------------------------------------------------------------------------ LLaVA
def test_llava_jsons(toy):
    pretrain = json.loads((toy / "llava" / "pretrain.json").read_text())
    instruct = json.loads((toy / "llava" / "instruct.json").read_text())
    assert len(pretrain) == CFG.n_train
    text_only = [r for r in instruct if "image" not in r]
    assert len(text_only) == CFG.n_train // CFG.text_only_every and len(instruct) == CFG.n_train + len(text_only)
    kinds = Counter()
    for rec in pretrain + instruct:
        conv = rec["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
        if "image" in rec:
            assert (toy / "images" / rec["image"]).is_file()
            assert conv[0]["value"].startswith("<image>\n")
        assert sum(c["value"].count("<image>") for c in conv) == ("image" in rec)
        for q, a in zip(conv[::2], conv[1::2]):
            if q["value"].endswith(MC_SUFFIX):
                kinds["mc"] += 1
                assert a["value"] in LETTERS and "\nA. " in q["value"] and "\nD. " in q["value"]
            elif q["value"].endswith(SHORT_SUFFIX):
                kinds["short"] += 1
                if q["value"].startswith("Is there "):
                    kinds["pope"] += 1
                    assert a["value"] in ("Yes", "No")
    assert pretrain[0]["conversations"][0]["value"].startswith("<image>\n")
    assert kinds["mc"] > 10 and kinds["short"] > 10 and kinds["pope"] > 5


# ------------------------------------------------------------------------------------------------ POPE
def test_pope_rules(toy, test_scenes):
    rows = _read_jsonl(toy / "pope" / "pope.jsonl")
    stats = ObjectStats.from_json(json.loads((toy / "stats.json").read_text()))
    assert {r["category"] for r in rows} == {"random", "popular", "adversarial"}
    assert len({r["question_id"] for r in rows}) == len(rows)
    by_image: dict = {}
    for r in rows:
        present = {o["name"] for o in test_scenes[r["image"]]["objects"]}
        assert r["question"] == f"Is there {'an' if r['object'][0] in 'aeiou' else 'a'} {r['object']} in the image?"
        assert (r["object"] in present) == (r["answer"] == "yes")  # negatives never present, positives always
        by_image.setdefault(r["image"], {}).setdefault(r["category"], []).append(r)
    assert len(by_image) == CFG.pope_images
    for image, cats in by_image.items():
        pos = {c: sorted(r["object"] for r in rs if r["answer"] == "yes") for c, rs in cats.items()}
        assert pos["random"] == pos["popular"] == pos["adversarial"] and 1 <= len(pos["random"]) <= 3
        scene = test_scenes[image]
        for c, rs in cats.items():
            neg = [r["object"] for r in rs if r["answer"] == "no"]
            assert len(neg) == len(pos[c]) and len(set(neg)) == len(neg)
            if c != "random":  # deterministic rules: recompute them
                assert neg == negatives(scene, len(neg), c, np.random.default_rng(0), stats)


def test_pope_negative_rules_follow_statistics():
    scene = {"objects": [make_object(np.random.default_rng(0), "red circle", 0, "large")]}
    scenes = [{"objects": [{"name": n} for n in names]} for names in (
        ["red circle", "blue star"], ["red circle", "blue star"], ["red circle", "green heart"],
        ["black cross"], ["black cross"], ["black cross"], ["black cross", "blue star"])]
    stats = ObjectStats.from_scenes(scenes)
    assert negatives(scene, 2, "popular", np.random.default_rng(0), stats) == ["black cross", "blue star"]
    assert negatives(scene, 2, "adversarial", np.random.default_rng(0), stats) == ["blue star", "green heart"]
    rnd = negatives(scene, 63, "random", np.random.default_rng(0), stats)
    assert sorted(rnd) == sorted(o for o in OBJECTS if o != "red circle")


# ------------------------------------------------------------------------------------------------ SeedBench
def test_seedbench_answers_in_choices_and_balanced(toy, test_scenes):
    rows = _read_jsonl(toy / "seedbench" / "seedbench.jsonl")
    assert {r["category"] for r in rows} == set(SEED_CATEGORIES)
    letters: dict[str, Counter] = {}
    for r in rows:
        choices = [r[f"choice_{x}"] for x in "abcd"]
        assert len(set(choices)) == 4 and r["answer"] in LETTERS
        assert r["question_type_id"] == SEED_CATEGORIES[r["category"]] and (toy / "images" / r["image"]).is_file()
        letters.setdefault(r["category"], Counter())[r["answer"]] += 1
        answer = choices[LETTERS.index(r["answer"])]
        objs = test_scenes[r["image"]]["objects"]
        names = {o["name"]: o for o in objs}
        q = r["question"]
        if q == "How many objects are there in the image?":
            assert answer == str(len(objs))
        elif q.startswith("Where is the ") and q.endswith(" in the image?"):
            assert answer == names[q[len("Where is the "):-len(" in the image?")]]["position"]
        elif q == "Which object can be seen in the image?":
            assert answer in names and not set(choices) - {answer} & set(names)
        elif q == "Which object is not in the image?":
            assert answer not in names and set(choices) - {answer} <= set(names)
        elif q == "What is the background of the image?":
            assert answer == test_scenes[r["image"]]["background"]
    for cat, cnt in letters.items():
        assert max(cnt.values()) - min(cnt.get(x, 0) for x in LETTERS) <= 1, (cat, cnt)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_no_unk(toy):


    tok = AutoTokenizer.from_pretrained(str(toy / "tokenizer"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == 4
    caption = json.loads(_wds_samples(toy, "train")[0]["json"])["short_caption"]
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True).lower() == caption.lower()
    assert tok.decode(tok("Red circle.").input_ids, skip_special_tokens=True) == "red circle."  # lowercased
    for letter in LETTERS:  # answer letters keep their case (lmms-eval's SeedBench compares them exactly)
        assert tok.decode(tok(letter).input_ids, skip_special_tokens=True) == letter
    assert tok("<image>\nhi").input_ids[:2] == [1, 4]
    texts = [SYSTEM_PROMPT, "USER: ASSISTANT:", SHORT_SUFFIX, MC_SUFFIX, "A B C D"]
    for split in ("train", "val", "test"):
        for m in _wds_metas(toy, split):
            texts += [m["caption"], m["recaption"], m["short_caption"]]
    for name in ("pretrain", "instruct"):
        for rec in json.loads((toy / "llava" / f"{name}.json").read_text()):
            texts += [c["value"] for c in rec["conversations"]]
    for r in _read_jsonl(toy / "seedbench" / "seedbench.jsonl"):
        texts += [r["question"]] + [r[f"choice_{x}"] for x in "abcd"]
    texts += [r["question"] for r in _read_jsonl(toy / "pope" / "pope.jsonl")]
    unk = [t for t, ids in zip(texts, tok(texts).input_ids) if tok.unk_token_id in ids]
    assert unk == []


# ------------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("res", [32, 64, 128])
def test_render_resolutions_antialiased(res):
    scene = {"background": "white", "objects": [make_object(np.random.default_rng(1), "red circle", 4, "large")]}
    img = np.asarray(render_scene(scene, res))
    assert img.shape == (res, res, 3)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert (250, 250, 250) in colours and (220, 30, 35) in colours and len(colours) > 3  # edge blends
    assert img[res // 2, res // 2].tolist() == [220, 30, 35] and img[1, 1].tolist() == [250, 250, 250]


# ------------------------------------------------------------------------------------------------ summary, CLI
def test_summary_report(toy, tmp_path):
    report = main(["--data", str(toy), "--out", str(tmp_path)])
    for name in ("toyworld.md", "toyworld.json", "toyworld_samples.png"):
        assert (tmp_path / name).is_file()
    assert report["counts"]["train"] == {"shards": 3, "wds_samples": 64, "image_files": 64}
    assert sum(report["pope"]["answers_per_category"]["random"].values()) > 0
    assert Image.open(tmp_path / "toyworld_samples.png").size[0] > 400


def test_cli_flags_config_and_overrides():
    out, cfg, workers, progress = parse_args(["--out", "x", "--resolution", "128", "--n-train", "5", "--quiet"])
    assert (out, cfg.resolution, cfg.n_train, cfg.n_val, progress) == ("x", 128, 5, 1000, False)
    _, cfg, _, _ = parse_args(["--out", "x", "--config", str(CONFIGS / "toy128.yaml"), "--n-val", "7", "seed=3"])
    assert (cfg.resolution, cfg.n_train, cfg.n_val, cfg.seed) == (128, 20000, 7, 3)
    assert parse_args(["--out", "x", "--config", str(CONFIGS / "toy.yaml")])[1] == ToyConfig()
    with pytest.raises(ConfigError, match="n_trian"):
        parse_args(["--out", "x", "n_trian=5"])
    with pytest.raises(SystemExit):
        parse_args(["--resolution", "64"])  # --out is required


# ------------------------------------------------------------------------------------------------ poison
def _outcome(sample: dict) -> str:
    try:
        decode_image(sample.get("jpg", sample.get("png")))
        decode_text(sample.get("txt"))
        decode_json(sample.get("json"))
    except BadSample as e:
        return e.reason
    return "keep"


def test_poisoned_shard_has_every_kind(tmp_path):
    import webdataset as wds


    manifest = write_poisoned_shard(str(tmp_path / "poison.tar"), n_good=4)
    samples = list(wds.WebDataset(str(tmp_path / "poison.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(manifest)
    got = {s["__key__"]: _outcome(s) for s in samples}
    assert got == {k: v["expected"] for k, v in manifest.items()}
    assert set(expected_counts(manifest)) == {"keep", "empty_file", "truncated", "not_an_image", "too_small",
                                              "bad_aspect", "missing_caption", "empty_caption", "bad_utf8", "bad_json"}
    modes = {s["__key__"]: Image.open(io.BytesIO(s.get("jpg", s.get("png")))).mode for s in samples
             if s["__key__"].startswith("odd_")}
    assert modes == {"odd_cmyk_jpeg": "CMYK", "odd_16bit_png": "I;16", "odd_rgba_png": "RGBA",
                     "odd_palette_png": "P", "odd_grayscale_jpeg": "L"}


def test_poisoned_llava_json(tmp_path):
    manifest = write_poisoned_llava(str(tmp_path / "bad.json"), str(tmp_path / "img"), n_good=2)
    records = json.loads((tmp_path / "bad.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(manifest)
    for r in records:
        if "image" not in r:
            got = "keep"
        else:
            path = tmp_path / "img" / r["image"]
            try:
                decode_image(path.read_bytes() if path.exists() else None)
                got = "keep"
            except BadSample as e:
                got = e.reason
        assert got == manifest[r["id"]], r["id"]
    assert {"missing_image", "truncated", "empty_file", "not_an_image", "too_small"} <= set(manifest.values())


def test_letter_records(toy):
    """llava/letters.json (stage 2's letter share): single-turn 4-choice records on training images, the answer one of
    the prompt's option letters, letters spread over A-D, the count the config asks for."""
    recs = json.loads((toy / "llava" / "letters.json").read_text())
    assert len(recs) == CFG.letter_records > 0 and len({r["id"] for r in recs}) == len(recs)
    assert load_meta(str(toy))["counts"]["letters"] == len(recs)
    for r in recs:
        assert r["image"].startswith("train/") and (toy / "images" / r["image"]).is_file()
        (h, g) = r["conversations"]
        assert h["from"] == "human" and h["value"].startswith("<image>\n") and h["value"].endswith(MC_SUFFIX)
        assert g["from"] == "gpt" and f"\n{g['value']}. " in h["value"]
    counts = Counter(r["conversations"][1]["value"] for r in recs)
    assert set(counts) == set("ABCD") and min(counts.values()) >= len(recs) // 10
