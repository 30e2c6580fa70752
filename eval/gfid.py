"""gFID runner: class-conditional samples (ADM protocol: N per class, ``arr_0`` uint8 NHWC npz) vs real images.

The generator is a plain function ``generate(labels: LongTensor[B]) -> images [B, 3, H, W] in [-1, 1]``; how it is
built from an RAE run is configurable (``sampler = "module:function"``, called as
``function(run_dir, device, seed=, steps=, cfg_scale=) -> (generate, class_names)``; default
:func:`eval.adapters.rae_sampler`), so this runner depends only on that small interface. Samples written by
``make rae-sample`` (an ADM npz) can be scored directly with ``--samples``.

Real images: a class-split folder (``<root>/<class>/*.png``; ``real_per_class`` first images of every class),
any folder, or an (ADM reference) npz.

Every samples npz written here gets its sampling manifest beside it (:mod:`rae_generation.manifest`); a sampler factory may
attach the generator's part as ``generate.manifest`` (:func:`eval.adapters.rae_sampler` does). Results carry the
number of samples, the manifest and the sha256 of the reference statistics.

    python -m eval.gfid --samples runs/toy/rae/samples.npz --real data/toy/classes/val --out runs/eval/gfid
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eval.fid import DEFAULT_WEIGHTS, IMAGE_EXTS, FidInputError, compute_metrics, read_npz
from ov3common.checkpoint import atomic_write, atomic_write_json
from ov3common.config import import_object
from ov3common.dist import step_seed
from ov3common.images import save_image_grid, to_uint8
from ov3common.log import progress
from rae_generation.manifest import class_balance, read_manifest, write_manifest

Generator = Callable[[torch.Tensor], torch.Tensor]


def class_folders(root: str | Path) -> list[Path]:
    """Class sub-folders of an ImageFolder root, sorted by name (torchvision's label order)."""
    dirs = sorted(p for p in Path(root).iterdir() if p.is_dir())
    if not dirs:
        raise FidInputError(f"{root}: no class sub-folders")
    return dirs


def class_real_images(root: str | Path, per_class: int = 0) -> list[Path]:
    """The first ``per_class`` images (sorted) of every class folder (0 = all)."""
    out = []
    for d in class_folders(root):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        out += files[:per_class] if per_class > 0 else files
    if not out:
        raise FidInputError(f"{root}: class folders hold no images")
    return out


@torch.no_grad()
def generate_samples(generate: Generator, num_classes: int, per_class: int, batch_size: int = 32,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` samples of every class → (uint8 NHWC images, int64 labels); batch i is seeded by
    ``step_seed(seed, i)`` so the set does not depend on anything but (seed, batch size)."""

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = []
    for i, start in enumerate(progress(range(0, len(labels), batch_size), desc="gfid sample")):
        torch.manual_seed(step_seed(seed, i))
        y = labels[start:start + batch_size]
        x = generate(y)
        if x.ndim != 4 or x.shape[0] != len(y) or x.shape[1] != 3:
            raise ValueError(f"generator returned {tuple(x.shape)} for {len(y)} labels; want [B, 3, H, W]")
        images.append(to_uint8(x.float().clamp(-1, 1)))
    return np.concatenate(images), labels.numpy()


def write_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """ADM layout: ``arr_0`` uint8 NHWC (+ ``arr_1`` int64 labels), written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, *([images] if labels is None else [images, labels]))

    atomic_write(path, write)
    return Path(path)


def load_sampler(spec: str, run_dir: str | Path, device: str, **options) -> tuple[Generator, list[str] | None]:
    """Import ``module:function`` and call it as ``function(run_dir, device, **options)``."""
    factory = import_object(spec, "sampler")
    gen, names = factory(str(run_dir), device, **options)
    return gen, list(names) if names is not None else None


def sample_grid(images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None,
                path: str | Path, max_tiles: int = 64) -> Path:
    """One sample per class (up to ``max_tiles``), labelled with the class name when known."""

    if labels is not None:
        first = {int(c): i for i, c in reversed(list(enumerate(labels)))}
        idx = [first[c] for c in sorted(first)][:max_tiles]
    else:
        idx = list(range(min(max_tiles, len(images))))
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    names = None
    if labels is not None and class_names:
        names = [class_names[int(labels[i])] if int(labels[i]) < len(class_names) else str(labels[i]) for i in idx]
    save_image_grid(x, path, nrow=8, labels=names)
    return Path(path)


def write_generated(path: str | Path, images: np.ndarray, labels: np.ndarray, generate=None, seed: int = 0,
                    class_names: list[str] | None = None) -> Path:
    """Write a generated set (ADM npz) and its sampling manifest (generator fields from ``generate.manifest``)."""

    write_samples_npz(path, images, labels)
    balance, per = class_balance(labels)
    fields = dict(getattr(generate, "manifest", None) or {"sampler": "<unknown generator>"})
    fields.update(per_class=per, num_samples=int(len(labels)), class_balance=balance, seed=seed,
                  num_classes=fields.get("num_classes", int(labels.max()) + 1 if len(labels) else 0),
                  written_by="eval.gfid")
    if class_names:
        fields["classes"] = list(class_names)
    write_manifest(path, fields)
    return Path(path)


def run_gfid(samples: str | Path | np.ndarray, real: str | Path | list[Path], out_dir: str | Path, *,
             labels: np.ndarray | None = None, class_names: list[str] | None = None,
             weights: str | Path = DEFAULT_WEIGHTS, cache_dir: str | Path | None = None, kid_subsets: int = 20,
             batch_size: int = 32, device: str = "cpu", bootstrap: int = 0, fused: bool = True,
             precision: str = "fp32") -> dict:
    """FID (+ the ADM suite) of the samples vs the real set; writes ``gfid.json`` and ``samples_grid.png`` into
    ``out_dir``. ``bootstrap`` > 0: a 95% interval of FID over the samples."""

    if not isinstance(samples, np.ndarray):
        z = read_npz(samples)
        if "arr_0" not in z:
            raise FidInputError(f"{samples}: samples npz needs arr_0 images")
        with np.load(samples) as f:
            labels = f["arr_1"] if labels is None and "arr_1" in f.files else labels
        images, source = z["arr_0"], str(samples)
        manifest = read_manifest(samples)
    else:
        images, source, manifest = samples, "<generated>", None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fid = compute_metrics(images, real, weights, cache_dir=cache_dir, kid_subsets=kid_subsets,
                          batch_size=batch_size, device=device, bootstrap=bootstrap, fused=fused,
                          precision=precision)
    fid["fake"] = source
    grid = sample_grid(images, labels, class_names, out / "samples_grid.png")
    result = {"gfid": fid["fid"], "sfid": fid.get("sfid"), "n": int(len(images)),
              "per_class": int(np.bincount(labels).max()) if labels is not None and len(labels) else None,
              "ref_stats_sha256": fid["ref_stats_sha256"], "fid_interval": fid.get("fid_interval"),
              "manifest": manifest, "grid": str(grid), "fid_details": fid}
    atomic_write_json(out / "gfid.json", result)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.gfid", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="ADM npz of samples (arr_0 [, arr_1 labels])")
    src.add_argument("--run", help="RAE run dir, sampled through --sampler")
    ap.add_argument("--sampler", default="eval.adapters:rae_sampler")
    ap.add_argument("--steps", type=int, default=0, help="ODE steps (0: the run's default)")
    ap.add_argument("--cfg-scale", type=float, default=-1.0, help="guidance scale (< 0: the run's default)")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--num-classes", type=int, default=0, help="default: the class folders of --real")
    ap.add_argument("--real", required=True, help="class-split folder, folder or (ADM) npz")
    ap.add_argument("--real-per-class", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--cache-dir", default="runs/fid_cache")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=100, help="resamples of the FID interval (0 = none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    real: str | list[Path] = args.real
    names = None
    if Path(args.real).is_dir() and all(p.is_dir() for p in Path(args.real).iterdir()):
        names = [d.name for d in class_folders(args.real)]
        real = class_real_images(args.real, args.real_per_class)
    samples, labels = args.samples, None
    if args.run:
        gen, gen_names = load_sampler(args.sampler, args.run, args.device, seed=args.seed, steps=args.steps,
                                      cfg_scale=args.cfg_scale)
        names = gen_names or names
        n_cls = args.num_classes or (len(names) if names else 0)
        if not n_cls:
            raise SystemExit("error: --num-classes is needed when --real is not a class-split folder")
        samples, labels = generate_samples(gen, n_cls, args.per_class, args.batch_size, args.seed)
        samples = write_generated(Path(args.out) / "samples.npz", samples, labels, gen, args.seed, names)
    r = run_gfid(samples, real, args.out, labels=labels, class_names=names, weights=args.weights,
                 cache_dir=args.cache_dir or None, batch_size=args.batch_size, device=args.device,
                 bootstrap=args.bootstrap)
    print(json.dumps({k: v for k, v in r.items() if k != "fid_details"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
