"""Build the whole toy world under one directory (see ov3common/toyworld/README.md for the layout).

Work is split into index ranges run by a process pool: workers render and write the image files, the parent
writes the shards and JSONs in index order, so the output is byte-identical for any worker count, any chunk
size and across runs.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from ov3common.log import progress
from ov3common.shards import iter_tar

from . import world
from .evalsets import build_pope, build_seedbench
from .llava import letter_records, text_only_record
from .questions import ObjectStats
from .render import JPEG_QUALITY, supersample_factor
from .samples import Task, dumps, image_relpath, run_task, scenes_for
from .tokenizer import build_vocab, save_tokenizer, unknown_words

SPLITS = ("train", "val", "test")
TAR_MTIME = 946684800  # 2000-01-01 (an int: a float mtime makes tarfile add a PAX header per member)
MANAGED = ("wds", "images", "llava", "pope", "seedbench", "classes", "tokenizer", "meta.json", "stats.json", ".done")


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the toy world's bytes (except ``chunk``, the task size, which does not)."""

    resolution: int = 64
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    seed: int = 0
    shard_size: int = 1000
    class_train: int = 100
    class_val: int = 10
    pope_images: int = 150
    seedbench_per_category: int = 150
    text_only_every: int = 20  # one text-only record after every N image records of the instruction mix
    letter_records: int = 20000  # single-turn 4-choice records on train images (llava/letters.json; stage 2's letter share)
    jpeg_quality: int = JPEG_QUALITY
    chunk: int = 250

    @classmethod
    def tiny(cls, **overrides) -> ToyConfig:
        """A seconds-fast toy world for tests (32 px, a few dozen images per split)."""
        base = {"resolution": 32, "n_train": 64, "n_val": 16, "n_test": 48, "shard_size": 24, "class_train": 3,
                "class_val": 1, "pope_images": 12, "seedbench_per_category": 10, "text_only_every": 8,
                "letter_records": 96, "chunk": 16}
        return cls(**{**base, **overrides})

    def counts(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


def _tasks(cfg: ToyConfig, out: str) -> list[Task]:
    tasks = []
    for split, n in cfg.counts().items():
        tasks += [Task(split, a, min(a + cfg.chunk, n), cfg.seed, cfg.resolution, cfg.jpeg_quality, out=out)
                  for a in range(0, n, cfg.chunk)]
    for split, n in (("classes_train", cfg.class_train), ("classes_val", cfg.class_val)):
        if n > 0:
            tasks += [Task(split, 0, n, cfg.seed, cfg.resolution, cfg.jpeg_quality, class_index=c, out=out)
                      for c in range(len(world.CLASSES))]
    return tasks


def _write_json(path: str, obj, indent: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + "\n")


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in rows)


class _ShardSet:
    """Writes ``<root>/shard-%06d.tar`` with webdataset's TarWriter, ``size`` samples per shard."""

    def __init__(self, root: str, size: int):
        self.root, self.size, self.writer, self.shard, self.count = root, size, None, -1, 0
        os.makedirs(root, exist_ok=True)

    def write(self, sample: dict) -> None:
        from webdataset import TarWriter  # imported here: webdataset imports torch (slow worker start-up)

        shard = self.count // self.size
        if shard != self.shard:
            self.close()
            path = os.path.join(self.root, f"shard-{shard:06d}.tar")
            self.writer = TarWriter(path, encoder=False, mtime=TAR_MTIME, user="toy", group="toy")
            self.shard = shard
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _InProcess:
    """The subset of ``multiprocessing.Pool`` used here, run in this process (workers <= 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, fn, iterable) -> Iterator:
        return map(fn, iterable)

    def starmap(self, fn, iterable) -> list:
        return list(itertools.starmap(fn, iterable))


def _pool(workers: int):
    return mp.get_context("spawn").Pool(workers) if workers > 1 else _InProcess()


def _train_stats(cfg: ToyConfig, pool) -> ObjectStats:
    ranges = [(a, min(a + 2500, cfg.n_train)) for a in range(0, cfg.n_train, 2500)]
    parts = pool.starmap(partial(scenes_for, "train", cfg.seed), ranges)
    return ObjectStats.from_scenes([s for p in parts for s in p])


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return tqdm(total=total, disable=True)

    return progress(total=total, desc="toy world", unit="img", mininterval=1.0)


def _clean(out: str) -> None:
    for name in MANAGED:
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


class _Sink:
    """Receives the workers' results in task order and writes shards, image files and class images."""

    def __init__(self, out: str, cfg: ToyConfig):
        self.out, self.cfg = out, cfg
        self.shards = {s: _ShardSet(os.path.join(out, "wds", s), cfg.shard_size) for s in SPLITS}
        for s in SPLITS:
            os.makedirs(os.path.join(out, "images", s), exist_ok=True)
        self.scenes: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.pretrain: list[dict] = []
        self.instruct: list[dict] = []
        self.texts: list[str] = []
        self.n_text_only = 0
        self.class_counts = {"train": 0, "val": 0}

    def add(self, task: Task, result: list) -> None:
        if task.class_index >= 0:  # the worker wrote the PNGs
            self.class_counts[task.split.removeprefix("classes_")] += len(result)
            return
        for rec in result:
            self.shards[task.split].write({"__key__": rec["key"], "jpg": rec["jpg"], "txt": rec["txt"].encode("utf-8"),
                                           "json": rec["json"].encode("utf-8")})
            self.scenes[task.split].append(rec["scene"])
            self.texts += [rec["txt"], rec["recaption"]]
            if "pretrain" in rec:
                self.pretrain.append(rec["pretrain"])
                self.instruct.append(rec["instruct"])
                if len(self.pretrain) % self.cfg.text_only_every == 0:  # interleave text-only records
                    rng = np.random.default_rng([world.split_seed(self.cfg.seed, "train"), self.n_text_only, 3])
                    self.instruct.append(text_only_record(f"text_{self.n_text_only:07d}", rng))
                    self.n_text_only += 1

    def close(self) -> None:
        for s in self.shards.values():
            s.close()


def generate(out: str, cfg: ToyConfig | None = None, workers: int = 2, progress: bool = True) -> dict:
    """Write the toy world to ``out`` and return its meta dict (also written to ``out/meta.json``)."""
    cfg = cfg or ToyConfig()
    if cfg.n_train < 1 or cfg.n_test < 1 or cfg.resolution < 8 or cfg.shard_size < 1 or cfg.text_only_every < 1:
        raise ValueError(f"need n_train, n_test, shard_size, text_only_every >= 1 and resolution >= 8; got {cfg}")
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    _clean(out)
    timings = {"clean": time.perf_counter() - t0}
    vocab = build_vocab()
    timings["vocab"] = time.perf_counter() - t0 - timings["clean"]
    sink = _Sink(out, cfg)
    tasks = _tasks(cfg, out)
    with _pool(workers) as pool:
        stats = _train_stats(cfg, pool)
        with _progress_bar(sum(t.stop - t.start for t in tasks), progress) as bar:
            for task, result in pool.imap(partial(run_task, stats=stats), tasks):
                sink.add(task, result)
                bar.update(task.stop - task.start)
    sink.close()
    timings["images"] = time.perf_counter() - t0 - sum(timings.values())
    scenes, pretrain, instruct, texts = sink.scenes, sink.pretrain, sink.instruct, sink.texts
    n_text_only, class_counts = sink.n_text_only, sink.class_counts

    test_images = [image_relpath("test", i) for i in range(cfg.n_test)]
    pope = build_pope(scenes["test"], test_images, stats, cfg.pope_images, cfg.seed)
    seed = build_seedbench(scenes["test"], test_images, cfg.seedbench_per_category, cfg.seed)
    _write_json(os.path.join(out, "llava", "pretrain.json"), pretrain)
    _write_json(os.path.join(out, "llava", "instruct.json"), instruct)
    train_items = [(image_relpath("train", i), sc) for i, sc in enumerate(scenes["train"])]
    letters = letter_records(train_items, cfg.letter_records, cfg.seed)
    _write_json(os.path.join(out, "llava", "letters.json"), letters)
    _write_jsonl(os.path.join(out, "pope", "pope.jsonl"), pope)
    _write_jsonl(os.path.join(out, "seedbench", "seedbench.jsonl"), seed)

    for rows, fields in ((pope, ("question",)), (seed, ("question", "choice_a", "choice_b", "choice_c", "choice_d"))):
        texts += [r[f] for r in rows for f in fields]
    texts += [c["value"] for r in pretrain + instruct + letters for c in r["conversations"]]
    unk = unknown_words(texts, vocab)
    if unk:
        raise RuntimeError(f"tokenizer vocabulary misses words emitted by the generator: {sorted(unk)[:20]}")
    timings["texts"] = time.perf_counter() - t0 - sum(timings.values())
    save_tokenizer(os.path.join(out, "tokenizer"), vocab)
    _write_json(os.path.join(out, "stats.json"), stats.to_json())

    meta = {
        "generator_version": world.GENERATOR_VERSION,
        "config": {k: v for k, v in asdict(cfg).items() if k != "chunk"},
        "seed": cfg.seed,
        "split_seeds": {s: world.split_seed(cfg.seed, s) for s in world.SPLIT_CODES},
        "resolution": cfg.resolution,
        "supersample": supersample_factor(cfg.resolution),
        "shapes": list(world.SHAPES),
        "colors": {k: list(v) for k, v in world.COLORS.items()},
        "sizes": dict(world.SIZES),
        "backgrounds": {k: [list(c) for c in v] for k, v in world.BACKGROUNDS.items()},
        "themes": [{"name": t.name, "objects": list(t.objects), "backgrounds": list(t.backgrounds)}
                   for t in world.THEMES],
        "positions": list(world.POSITION_NAMES),
        "objects": list(world.OBJECTS),
        "classes": list(world.CLASSES),
        "image_root": "images",
        "counts": {
            "images": cfg.counts(),
            "shards": {s: -(-n // cfg.shard_size) for s, n in cfg.counts().items()},
            "pretrain": len(pretrain),
            "instruct": len(instruct),
            "instruct_text_only": n_text_only,
            "letters": len(letters),
            "pope": len(pope),
            "seedbench": len(seed),
            "classes": class_counts,
            "single_object": {s: sum(len(sc["objects"]) == 1 for sc in v) for s, v in scenes.items()},
        },
        "vocab_size": len(vocab),
    }
    _write_json(os.path.join(out, "meta.json"), meta, indent=1)
    with open(os.path.join(out, ".done"), "w") as f:
        f.write(world.GENERATOR_VERSION + "\n")
    timings["tokenizer_meta"] = time.perf_counter() - t0 - sum(timings.values())
    # timings are returned, not written: meta.json must stay byte-identical across runs
    return {**meta, "seconds": round(time.perf_counter() - t0, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()}}


def load_meta(root: str) -> dict:
    """The ``meta.json`` of a generated toy world (raises FileNotFoundError naming the path)."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no toy world at {root!r} ({path} missing): run `make data`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_scenes(folder: str, key: str) -> list[dict]:
    """The per-sample json (key, split, scene, captions) of every sample in the webdataset shards under ``folder``
    (one split of ``<root>/wds``); FileNotFoundError naming the config ``key`` when there are none."""
    urls = sorted(glob.glob(os.path.join(folder, "*.tar")))
    metas = [json.loads(s.members["json"]) for u in urls for s in iter_tar(u)]
    if not metas:
        raise FileNotFoundError(f"{key}: no webdataset shards with scenes under {folder}")
    return metas
