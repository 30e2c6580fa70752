"""``python -m ov3common.toyworld.summary --data data/toy --out reports``: what the toy world contains.

Reads every format back (webdataset shards, JSONs, image folders), prints a short report and writes
``toyworld.md``, ``toyworld.json`` and ``toyworld_samples.png`` (sample scenes with their captions).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import textwrap
from collections import Counter

from PIL import Image

from ov3common.shards import iter_tar

from .generate import SPLITS, load_meta


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_shards(root: str, split: str) -> tuple[int, list[dict], list[tuple[bytes, dict]]]:
    urls = sorted(glob.glob(os.path.join(root, "wds", split, "shard-*.tar")))
    metas, firsts = [], []
    if not urls:
        return 0, metas, firsts
    for sample in (s for url in urls for s in iter_tar(url)):
        meta = json.loads(sample.members["json"])
        metas.append(meta)
        if len(firsts) < 24:
            firsts.append((sample.members["jpg"], meta))
    return len(urls), metas, firsts


def _balance(rows: list[dict], by: str, col: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for r in rows:
        out.setdefault(r[by], Counter())[r[col]] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def collect(data: str) -> tuple[dict, list[tuple[bytes, dict]]]:
    """All summary numbers of the toy world at ``data`` and a few (jpeg, meta) samples for the grid."""
    meta = load_meta(data)
    report: dict = {"generator_version": meta["generator_version"], "resolution": meta["resolution"],
                    "seed": meta["seed"], "counts": {}}
    samples: list[tuple[bytes, dict]] = []
    class_hist: Counter = Counter()
    theme_hist: Counter = Counter()
    nobj_hist: Counter = Counter()
    for split in SPLITS:
        n_shards, metas, firsts = _read_shards(data, split)
        n_files = len(glob.glob(os.path.join(data, "images", split, "*.jpg")))
        report["counts"][split] = {"shards": n_shards, "wds_samples": len(metas), "image_files": n_files}
        if split == "train":
            samples = firsts
            for m in metas:
                theme_hist[m["scene"]["theme"]] += 1
                nobj_hist[len(m["scene"]["objects"])] += 1
                if m["class_name"] is not None:
                    class_hist[m["class_name"]] += 1
    with open(os.path.join(data, "llava", "pretrain.json"), encoding="utf-8") as f:
        pretrain = json.load(f)
    with open(os.path.join(data, "llava", "instruct.json"), encoding="utf-8") as f:
        instruct = json.load(f)
    turns = Counter(len(r["conversations"]) // 2 for r in instruct)
    report["counts"]["llava"] = {"pretrain": len(pretrain), "instruct": len(instruct),
                                 "instruct_text_only": sum("image" not in r for r in instruct),
                                 "instruct_turns": dict(sorted(turns.items()))}
    for split in ("train", "val"):
        folders = glob.glob(os.path.join(data, "classes", split, "*"))
        report["counts"][f"classes_{split}"] = {"classes": len(folders),
                                                "images": len(glob.glob(os.path.join(data, "classes", split, "*", "*.png")))}
    with open(os.path.join(data, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    freq = sorted(zip(stats["objects"], stats["frequency"]), key=lambda t: (-t[1], t[0]))
    pope = _read_jsonl(os.path.join(data, "pope", "pope.jsonl"))
    seed = _read_jsonl(os.path.join(data, "seedbench", "seedbench.jsonl"))
    report.update({
        "train_objects_per_image": {str(k): v for k, v in sorted(nobj_hist.items())},
        "train_themes": dict(sorted(theme_hist.items())),
        "train_single_object_class_histogram": {c: class_hist.get(c, 0) for c in meta["classes"]},
        "train_object_frequency_top10": dict(freq[:10]),
        "train_object_frequency_bottom5": dict(freq[-5:]),
        "pope": {"questions": len(pope), "images": len({r["image"] for r in pope}),
                 "answers_per_category": _balance(pope, "category", "answer")},
        "seedbench": {"questions": len(seed), "letters_per_category": _balance(seed, "category", "answer")},
    })
    return report, samples


def to_markdown(r: dict) -> str:
    c = r["counts"]
    lines = [f"# Toy world ({r['generator_version']}, {r['resolution']} px, seed {r['seed']})", "",
             "Toy data: checks that the pipeline works; nothing measured on it is a paper number.", "",
             "| split | shards | webdataset samples | image files |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {c[s]['shards']} | {c[s]['wds_samples']} | {c[s]['image_files']} |" for s in SPLITS]
    ll = c["llava"]
    lines += ["", f"LLaVA: {ll['pretrain']} pretrain records, {ll['instruct']} instruction records "
              f"({ll['instruct_text_only']} text-only; turns per record {ll['instruct_turns']}).",
              f"Class-conditional split: train {c['classes_train']}, val {c['classes_val']}.", "",
              f"Objects per train image: {r['train_objects_per_image']}", "",
              f"Themes (train): {r['train_themes']}", "",
              f"Most frequent objects (train): {r['train_object_frequency_top10']}", "",
              f"Least frequent objects (train): {r['train_object_frequency_bottom5']}", "",
              f"## POPE: {r['pope']['questions']} questions over {r['pope']['images']} test images", "",
              "| category | yes | no |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v.get('yes', 0)} | {v.get('no', 0)} |" for k, v in r["pope"]["answers_per_category"].items()]
    lines += ["", f"## SeedBench-style: {r['seedbench']['questions']} questions", "",
              "| category | A | B | C | D |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | " + " | ".join(str(v.get(x, 0)) for x in "ABCD") + " |"
              for k, v in r["seedbench"]["letters_per_category"].items()]
    hist = r["train_single_object_class_histogram"]
    lines += ["", "## Single-object train scenes per class", "",
              ", ".join(f"{k}: {v}" for k, v in hist.items()), "", "![samples](toyworld_samples.png)", ""]
    return "\n".join(lines)


def save_samples_png(samples: list[tuple[bytes, dict]], path: str, ncol: int = 4) -> None:
    """A grid of sample scenes, each with its alt-text (noisy) and short exact caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(samples), 16)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.9 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (jpg, meta) in zip(axes.flat, samples[:n]):
        ax.imshow(Image.open(io.BytesIO(jpg)).convert("RGB"), interpolation="nearest")
        title = textwrap.fill("alt: " + meta["caption"], 48) + "\n" + textwrap.fill(meta["short_caption"], 48)
        ax.set_title(title, fontsize=6.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ov3common.toyworld.summary", description=__doc__)
    p.add_argument("--data", default="data/toy")
    p.add_argument("--out", default="reports")
    args = p.parse_args(argv)
    report, samples = collect(args.data)
    os.makedirs(args.out, exist_ok=True)
    md = to_markdown(report)
    with open(os.path.join(args.out, "toyworld.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(args.out, "toyworld.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    save_samples_png(samples, os.path.join(args.out, "toyworld_samples.png"))
    print(md)
    return report


if __name__ == "__main__":
    main()
