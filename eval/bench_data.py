"""``make bench-data``: the encoder's streaming data path, measured in one run (CPU; timings are ratios of
interleaved rounds, the machine is shared).

1. Synthetic DataComp-layout shards (default 32 x 1,000 samples of ~256 px JPEGs; ``KEY.jpg``, ``KEY.txt``
   alt-text, ``KEY.json`` with ``re_caption``), built once under ``--root``.
2. Samples/s of our pipeline (read + shuffle buffer + decode + random resized crop to 224 + tokenize alt-text,
   recaption and one recaption sentence with a Llama SentencePiece tokenizer) vs open_clip's own webdataset
   pipeline (``open_clip_train.data.get_wds_dataset``: read + shuffle + decode + its RandomResizedCrop to 224 +
   normalise + its BPE tokenizer on the alt-text) on the same shards, worker count and batch size.
3. Start-up time (constructing the loader to the first batch) and peak RSS of a fresh process for 10, 100 and
   1,000 shards (the larger lists repeat the built shards through symlinks: 1,000 shards = 1M samples).
4. Time to the first batch after a mid-shard resume, vs a fresh start.
5. The map-style sets that stay map-style: LLaVA's 665K JSON records (``LlavaDataset``) and RAE's 1.28M
   ImageNet files (``ImageFolderSource`` over an empty-file tree + ``ResumableSampler``), start-up and memory.

Writes ``<out>/bench_data.json`` and a Markdown table ``<out>/bench_data.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss it does not carry the parent's peak over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- synthetic shards
def _shard(args) -> None:
    path, si, n, size = args
    from PIL import Image
    from webdataset import TarWriter

    rng = np.random.default_rng(si)
    tmp = path + ".tmp"
    with TarWriter(tmp) as w:
        for i in range(n):
            j = si * n + i
            w_, h_ = int(rng.integers(size * 3 // 4, size * 5 // 4)), int(rng.integers(size * 3 // 4, size * 5 // 4))
            low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((w_, h_), Image.BICUBIC)  # photo-like JPEG size: smooth + grain
            img = Image.blend(img, Image.effect_noise((w_, h_), 60).convert("RGB"), 0.12)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            alt = f"photo {j} of a {['red', 'blue', 'green'][j % 3]} thing on a table"
            recap = (f"The image shows a {['red', 'blue', 'green'][j % 3]} object number {j} resting on a wooden "
                     f"table. The background is blurred and softly lit. A window is visible on the left side.")
            meta = {"uid": f"{j:016x}", "url": f"http://example.com/{j}.jpg", "caption": alt, "key": f"{j:09d}",
                    "re_caption": recap, "status": "success", "width": w_, "height": h_}
            w.write({"__key__": f"{j:09d}", "jpg": buf.getvalue(), "txt": alt.encode(), "json": json.dumps(meta).encode()})
    os.replace(tmp, path)


def build_shards(root: Path, shards: int, per_shard: int, size: int, procs: int, unique: int) -> list[str]:
    """``shards`` shard files; the first ``unique`` are written, the others are symlinks cycling over them (JPEG
    encoding is the slow part of the build on a shared CPU; reading is what is measured)."""
    from multiprocessing import Pool

    root.mkdir(parents=True, exist_ok=True)
    unique = min(unique or shards, shards)
    todo = [(str(root / f"{si:05d}.tar"), si, per_shard, size) for si in range(unique)
            if not (root / f"{si:05d}.tar").is_file()]
    if todo:
        with Pool(procs) as pool:
            pool.map(_shard, todo)
    for si in range(unique, shards):
        p = root / f"{si:05d}.tar"
        if not p.exists():
            p.symlink_to(f"{si % unique:05d}.tar")  # relative to the folder
    return [str(root / f"{si:05d}.tar") for si in range(shards)]


def shard_links(root: Path, base: list[str], n: int) -> str:
    """A folder of ``n`` shard names (symlinks cycling over the built shards); returns its brace pattern."""
    d = root / f"links_{n}"
    d.mkdir(exist_ok=True)
    for i in range(n):
        p = d / f"{i:05d}.tar"
        if not p.exists():
            p.symlink_to(Path(base[i % len(base)]).resolve())
    return f"{d}/{{00000..{n - 1:05d}}}.tar"


def sp_tokenizer(out: Path) -> str:
    """A Llama-family SentencePiece tokenizer from the mistral-common wheel (offline), saved as a fast HF
    tokenizer folder (converted once)."""
    import importlib.util
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    if (out / "tokenizer.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise SystemExit("bench-data needs mistral-common (the dev extra) for a real tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": False}))
        tok = AutoTokenizer.from_pretrained(tmp)
        if not tok.is_fast:
            raise SystemExit("bench-data: the SentencePiece tokenizer did not convert to a fast tokenizer")
        tok.save_pretrained(str(out))
    return str(out)


# ------------------------------------------------------------------------------------------- pipelines
def ours(pattern: str, tok: str, workers: int, batch: int, res: int, buffer: int, state=None):
    from encoder.data import Collate, DataConfig, ImageTextDecoder, Tokenize, train_loader
    from ov3common.shards import expand_urls

    cfg = DataConfig(preset="recap_datacomp", train_shards=pattern, num_workers=workers, shuffle_buffer=buffer,
                     crop="random_resized", max_text_len=77)
    tokenize = Tokenize(tok, cfg.max_text_len)
    dec = ImageTextDecoder(tokenize, res, cfg, seed=0)
    return train_loader(cfg, expand_urls(pattern), dec, Collate(tokenize.pad), 0, 0, 1, batch, 0, state)


def open_clip_loader(pattern: str, workers: int, batch: int, res: int, n_samples: int):
    from types import SimpleNamespace

    import open_clip
    from open_clip.transform import AugmentationCfg, image_transform
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=n_samples, dataset_resampled=False,
                           seed=0, batch_size=batch, workers=workers, world_size=1,
                           train_data_upsampling_factors=None, val_num_samples=None)
    pre = image_transform(res, is_train=True, aug_cfg=AugmentationCfg(scale=(0.4, 1.0)))
    return get_wds_dataset(args, pre, True, 0, tokenizer=open_clip.get_tokenizer("ViT-B-32")).dataloader


def rate(loader, batches: int, warmup: int) -> float:
    """Samples/s over ``batches`` batches after ``warmup`` (worker start-up and buffer fill excluded)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += len(b["key"]) if isinstance(b, dict) else len(b[0])
    return n / (time.perf_counter() - t0)


def throughput(a, pattern: str, tok: str, n_samples: int) -> dict:
    out: dict = {"ours": [], "open_clip": []}
    for _ in range(a.rounds):  # interleaved rounds, fresh loaders (the CPU is shared: compare medians)
        out["ours"].append(rate(ours(pattern, tok, a.workers, a.batch, a.res, a.buffer), a.batches, a.warmup))
        out["open_clip"].append(rate(open_clip_loader(pattern, a.workers, a.batch, a.res, n_samples), a.batches,
                                     a.warmup))
        print(f"  round: ours {out['ours'][-1]:.0f} samples/s, open_clip {out['open_clip'][-1]:.0f}", flush=True)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"rounds": out, "median": med, "ratio": med["ours"] / med["open_clip"],
            "per_worker": {k: v / max(a.workers, 1) for k, v in med.items()}}


# ------------------------------------------------------------------------------------------- probes (subprocess)
def probe_startup(pattern: str, tok: str, batch: int, res: int, buffer: int) -> dict:
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    loader = ours(pattern, tok, 0, batch, res, buffer)
    next(iter(loader))
    return {"first_batch_s": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss0}


def probe_resume(pattern: str, tok: str, batch: int, res: int, buffer: int, steps: int) -> dict:
    loader = ours(pattern, tok, 0, batch, res, buffer)
    it = iter(loader)
    for _ in range(steps):
        next(it)
    state = json.loads(json.dumps({s: {**v, "buffer": v["buffer"].tolist()} for s, v in loader.state.items()}))
    st = state["0"]
    t0 = time.perf_counter()
    next(iter(ours(pattern, tok, 0, batch, res, buffer, {int(k): v for k, v in state.items()})))
    resume = time.perf_counter() - t0
    t0 = time.perf_counter()
    next(iter(ours(pattern, tok, 0, batch, res, buffer)))
    return {"resume_first_batch_s": resume, "fresh_first_batch_s": time.perf_counter() - t0,
            "state": {"cursor": st["cursor"], "offset": st["offset"], "buffered": len(st["buffer"])}}


def probe_llava(root: Path, n: int, prepare: bool = False) -> dict:
    """LlavaDataset over ``n`` LLaVA-665K-like records (image paths cycle over 1,000 files); ``prepare`` writes
    them (in its own process, so that the measuring one starts clean)."""
    imgs = root / "llava_images"
    imgs.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        (imgs / f"{i:012d}.jpg").touch()
    js = root / f"llava_{n}.json"
    if not js.is_file():
        recs = [{"id": f"{i:012d}", "image": f"{i % 1000:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the man holding in the picture? Answer briefly."},
            {"from": "gpt", "value": "The man is holding a red umbrella while he crosses the busy street."},
            {"from": "human", "value": "What is the weather like?"},
            {"from": "gpt", "value": "It looks rainy and overcast, the road is wet."}]} for i in range(n)]
        js.write_text(json.dumps(recs))
    if prepare:
        return {}
    from llava_bridge.data import LlavaDataset

    rss0, t0 = _rss_mb(), time.perf_counter()
    ds = LlavaDataset([str(js)], str(imgs), None, "plain", lambda x: x, 2048, 576)
    return {"records": len(ds), "start_s": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss0}


def probe_rae(root: Path, n: int, classes: int = 1000) -> dict:
    """ImageFolderSource over ``n`` empty files in ``classes`` folders, then one epoch order of ResumableSampler."""
    from ov3common.data import ResumableSampler
    from rae_generation.data import ImageFolderSource

    tree = root / f"imagenet_{n}"
    if not (tree / ".done").is_file():
        per = -(-n // classes)
        for c in range(classes):
            d = tree / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(min(per, n - c * per)):
                (d / f"n{c:08d}_{i}.JPEG").touch()
        (tree / ".done").touch()
    rss0, t0 = _rss_mb(), time.perf_counter()
    ds = ImageFolderSource(tree, 256)
    t1 = time.perf_counter()
    order = ResumableSampler(len(ds), seed=0).order(0)
    return {"files": len(ds), "scan_s": t1 - t0, "epoch_order_s": time.perf_counter() - t1,
            "peak_rss_mb": _rss_mb(), "rss_before_mb": rss0, "n_order": len(order)}


def run_probe(*argv: str, timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OV3_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "eval.bench_data", "--probe", *argv], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"probe {argv} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(r: dict) -> str:
    t = r["throughput"]
    lines = [f"Shards: {r['shards']} x {r['per_shard']} samples ({r['unique']} distinct), {r['res']} px crops, batch {r['batch']}, "
             f"{r['workers']} workers, shuffle buffer {r['buffer']}; medians of {len(t['rounds']['ours'])} interleaved "
             f"rounds.", "",
             "| pipeline | samples/s | per worker |", "| --- | --- | --- |",
             f"| ours (decode + crop + 3 tokenizations) | {t['median']['ours']:.0f} | {t['per_worker']['ours']:.0f} |",
             f"| open_clip get_wds_dataset (decode + crop + 1 tokenization) | {t['median']['open_clip']:.0f} | "
             f"{t['per_worker']['open_clip']:.0f} |", f"| **ratio ours / open_clip** | **{t['ratio']:.2f}** | |", "",
             "| shards (samples) | start-up to first batch (s) | peak RSS (MB) | RSS growth for the loader (MB) |",
             "| --- | --- | --- | --- |"]
    for n, s in r["startup"].items():
        lines.append(f"| {n} ({int(n) * r['per_shard']:,}) | {s['first_batch_s']:.2f} | {s['peak_rss_mb']:.0f} | "
                     f"{s['peak_rss_mb'] - s['rss_before_mb']:.0f} |")
    rs = r["resume"]
    lines += ["", f"Mid-shard resume (cursor {rs['state']['cursor']}, offset {rs['state']['offset']}, "
              f"{rs['state']['buffered']} buffered samples re-read): first batch {rs['resume_first_batch_s']:.2f} s vs "
              f"{rs['fresh_first_batch_s']:.2f} s from a fresh start."]
    if "llava" in r:
        lv, ra = r["llava"], r["rae"]
        lines += ["", "| map-style set | size | start-up (s) | peak RSS (MB) |", "| --- | --- | --- | --- |",
                  f"| LLaVA JSON records (LlavaDataset) | {lv['records']:,} | {lv['start_s']:.1f} | "
                  f"{lv['peak_rss_mb']:.0f} |",
                  f"| RAE ImageFolder files (scan + one epoch order) | {ra['files']:,} | "
                  f"{ra['scan_s']:.1f} + {ra['epoch_order_s']:.1f} | {ra['peak_rss_mb']:.0f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/bench_data")
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--unique", type=int, default=4, help="shards written; the rest are symlinks (0: all)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--startup", default="10,100,1000")
    ap.add_argument("--no-mapstyle", action="store_true", help="skip the LLaVA 665K / RAE 1.28M measurements")
    ap.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    root = Path(a.root)
    import torch

    torch.set_num_threads(1)  # in-process parts (workers use one thread each anyway)
    if a.probe:
        kind, *rest = a.probe
        tok = str(root / "tokenizer")
        if kind == "startup":
            out = probe_startup(rest[0], tok, a.batch, a.res, a.buffer)
        elif kind == "resume":
            out = probe_resume(rest[0], tok, a.batch, a.res, a.buffer, int(rest[1]))
        elif kind in ("llava", "llava-prep"):
            out = probe_llava(root, int(rest[0]), prepare=kind == "llava-prep")
        else:
            out = probe_rae(root, int(rest[0]))
        print(json.dumps(out))
        return
    t0 = time.time()
    base = build_shards(root / "shards", a.shards, a.per_shard, a.size, max(1, os.cpu_count() or 1), a.unique)
    print(f"shards ready ({time.time() - t0:.0f} s)", flush=True)
    tok = sp_tokenizer(root / "tokenizer")
    pattern = f"{root / 'shards'}/{{00000..{a.shards - 1:05d}}}.tar"
    r: dict = {"shards": a.shards, "per_shard": a.per_shard, "unique": a.unique, "res": a.res, "batch": a.batch, "workers": a.workers,
               "buffer": a.buffer}
    r["throughput"] = throughput(a, pattern, tok, a.shards * a.per_shard)
    r["startup"] = {}
    for n in (int(x) for x in a.startup.split(",")):
        r["startup"][str(n)] = run_probe("startup", shard_links(root, base, n), f"--root={root}",
                                         f"--batch={a.batch}", f"--res={a.res}", f"--buffer={a.buffer}")
        print(f"  start-up {n} shards: {r['startup'][str(n)]}", flush=True)
    steps = (a.per_shard + a.per_shard // 2) // a.batch  # about the middle of the second shard
    r["resume"] = run_probe("resume", pattern, str(steps), f"--root={root}", f"--batch={a.batch}", f"--res={a.res}",
                            f"--buffer={a.buffer}")
    if not a.no_mapstyle:
        run_probe("llava-prep", "665000", f"--root={root}")
        r["llava"] = run_probe("llava", "665000", f"--root={root}")
        r["rae"] = run_probe("rae", "1281167", f"--root={root}")
    (root / "bench_data.json").write_text(json.dumps(r, indent=1))
    md = table(r)
    (root / "bench_data.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
