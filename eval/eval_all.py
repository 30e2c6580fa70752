"""``make eval-all``: run every evaluation that is available, for every encoder row, into one report.

    python -m eval.eval_all --config configs/eval/toy.yaml [key=value ...]

For each row (an encoder and the LLaVA / RAE runs built on it; by default OV3 and the baseline trained with
reconstruction weight 0) it runs, when the inputs exist:
  * SeedBench / POPE: scores ``<llava>/{seedbench,pope}_predictions.jsonl`` if present, else calls the configured
    predictor ``llava.predictor = "module:function"`` (default :func:`eval.adapters.llava_predictor`) as
    ``function(run_dir, device, batch_size=, max_new_tokens=) -> predict`` with ``predict(records) -> list[str]``
    on the records of :mod:`eval.benchmarks`;
  * SeedBench by answer ranking (piece ``seedbench_rank``, SEED-Bench's own protocol): scores
    ``<llava>/seedbench_rank_predictions.jsonl`` if present, else calls ``llava.ranker`` (default
    :func:`eval.adapters.llava_ranker`) as ``function(run_dir, device, batch_size=) -> predict``;
  * gFID: ``<rae>/samples/samples.npz`` (``make rae-sample``) or ``<rae>/samples.npz`` if present, else the
    configured sampler (default :func:`eval.adapters.rae_sampler`, called as
    ``function(run_dir, device, seed=, steps=, cfg_scale=) -> (generate(labels), class_names)``);
  * rFID + PSNR / SSIM / LPIPS: the encoder export on the rFID image set (:mod:`eval.rfid`).
Anything missing is reported as "—" with the reason; a piece that fails is reported with its error and the
command exits with status 1 after writing the report. Outputs: ``<out>/summary.json``, ``<out>/summary.md``,
per-row folders (predictions, grids, JSON) and training-curve PNGs from the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from eval.inception import DEFAULT_WEIGHTS
from ov3common.config import path_field


@dataclass
class RowConfig:
    name: str = ""
    encoder: str = ""        # encoder export folder (config.json + model.safetensors)
    encoder_run: str = ""    # encoder trainer run dir (metrics.jsonl → curves)
    llava: str = ""          # LLaVA run dir (predictions or a model for llava.predictor)
    rae: str = ""            # RAE run dir (samples.npz or a model for gfid.sampler)


@dataclass
class FidConfig:
    weights: str = DEFAULT_WEIGHTS
    cache_dir: str = "runs/fid_cache"
    batch_size: int = 32
    kid_subsets: int = 20


@dataclass
class LpipsConfig:
    net: str = "alex"
    backbone: str = "auto"   # auto | pretrained | random | none (no LPIPS)
    backbone_path: str = ""


@dataclass
class PopeConfig:
    path: str = path_field("data/toy/pope/pope.jsonl")
    image_root: str = ""
    split: str = "test"
    parser: str = "llava"
    limit_per_category: int = 0


@dataclass
class SeedConfig:
    path: str = path_field("data/toy/seedbench/seedbench.jsonl")
    image_root: str = ""
    split: str = "test"
    data_type: str = "image"
    limit_per_category: int = 0


@dataclass
class LlavaConfig:
    predictor: str = "eval.adapters:llava_predictor"   # function(run_dir, device, batch_size, max_new_tokens)
    batch_size: int = 8
    max_new_tokens: int = 16
    ranker: str = "eval.adapters:llava_ranker"   # function(run_dir, device, batch_size): SeedBench answer ranking


@dataclass
class RfidConfig:
    images: str = path_field("data/toy/images/val", "dir")
    max_images: int = 128
    batch_size: int = 32


@dataclass
class GfidConfig:
    real: str = path_field("data/toy/classes/val")   # class-split folder, folder or (ADM) npz
    real_per_class: int = 4
    per_class: int = 2
    batch_size: int = 32
    seed: int = 0
    steps: int = 0            # 0 = the RAE run's default
    cfg_scale: float = -1.0   # < 0 = the RAE run's default
    sampler: str = "eval.adapters:rae_sampler"   # function(run_dir, device, seed, steps, cfg_scale)


def _default_rows() -> list[RowConfig]:
    return [
        RowConfig("OV3 (ours)", "runs/toy/encoder/export", "runs/toy/encoder", "runs/toy/llava/ov3", "runs/toy/rae/ov3"),
        RowConfig("baseline (contrastive + caption, no recon)", "runs/toy/encoder_baseline/export",
                  "runs/toy/encoder_baseline", "runs/toy/llava/baseline", "runs/toy/rae/baseline"),
    ]


@dataclass
class EvalAllConfig:
    """Evaluate every available piece for every encoder row and write reports/summary.{json,md} + figures."""

    RENAMED = {"out": "out_dir"}
    out_dir: str = "reports"
    device: str = "auto"
    toy: bool = True
    rows: list[RowConfig] = field(default_factory=_default_rows)
    pieces: list[str] = field(default_factory=lambda: ["seedbench", "seedbench_rank", "pope", "gfid", "rfid"])
    fid: FidConfig = field(default_factory=FidConfig)
    lpips: LpipsConfig = field(default_factory=LpipsConfig)
    pope: PopeConfig = field(default_factory=PopeConfig)
    seedbench: SeedConfig = field(default_factory=SeedConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    rfid: RfidConfig = field(default_factory=RfidConfig)
    gfid: GfidConfig = field(default_factory=GfidConfig)


class Missing(Exception):
    """An input of a piece is absent: the piece is shown as '—' with this reason (not an error)."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "row"


def _import(spec: str, what: str):
    if ":" not in spec:
        raise ValueError(f"{what}: expected 'module:function', got {spec!r}")
    mod, fn = spec.split(":", 1)
    return getattr(importlib.import_module(mod), fn)


# ---------------------------------------------------------------------------------------------------- pieces
def _records(bench: str, cfg, cache: dict) -> list[dict]:
    from eval import benchmarks

    bench = "seedbench" if bench == "seedbench_rank" else bench
    bc = getattr(cfg, bench)
    if bench not in cache:
        kw = dict(image_root=bc.image_root or None, split=bc.split, limit_per_category=bc.limit_per_category or None)
        cache[bench] = (benchmarks.load_pope(bc.path, **kw) if bench == "pope"
                        else benchmarks.load_seedbench(bc.path, data_type=bc.data_type or None, **kw))
    return cache[bench]


def run_understanding(bench: str, cfg, row: RowConfig, out: Path, device: str, cache: dict) -> dict:
    from eval import benchmarks, score

    found = Path(row.llava) / f"{bench}_predictions.jsonl" if row.llava else None
    if found is not None and found.is_file():
        preds = found
    else:
        if not row.llava or not Path(row.llava).is_dir():
            raise Missing(f"no LLaVA run at {row.llava or '(row.llava not set)'}")
        rank = bench == "seedbench_rank"
        what, spec = ("llava.ranker", cfg.llava.ranker) if rank else ("llava.predictor", cfg.llava.predictor)
        try:
            factory = _import(spec, what)
        except (ImportError, AttributeError) as e:
            raise Missing(f"{what} {spec} is not available ({e})") from e
        records = _records(bench, cfg, cache)
        key = ("rank" if rank else "predict", row.llava)
        if key not in cache:  # the model is loaded once per row
            kw = {} if rank else {"max_new_tokens": cfg.llava.max_new_tokens}
            try:
                cache[key] = factory(row.llava, device, batch_size=cfg.llava.batch_size, **kw)
            except ImportError as e:
                raise Missing(f"{what} {spec} is not available ({e})") from e
        preds = benchmarks.write_predictions(records, cache[key](records), out / f"{bench}_predictions.jsonl")
    result = (score.score_file(bench, preds, cfg.pope.parser) if bench == "pope"
              else score.score_file("seedbench", preds))
    from ov3common.checkpoint import atomic_write_json

    atomic_write_json(out / f"{bench}_scores.json", result)
    return result


def _need_weights(cfg) -> None:
    if not Path(cfg.fid.weights).is_file():
        raise Missing(f"Inception weights {cfg.fid.weights} missing (run `make fid-weights`)")


def _export_has_decoder(path: str) -> None:
    conf = Path(path) / "config.json"
    if not path or not conf.is_file():
        raise Missing(f"no encoder export at {path or '(row.encoder not set)'}")
    if json.loads(conf.read_text()).get("decoder") is None:
        raise Missing("the encoder export has no ViT decoder (decode unavailable)")


def run_rfid_piece(cfg, row: RowConfig, out: Path, device: str, lpips_cache: dict) -> dict:
    from eval.recon import LPIPSMetric
    from eval.rfid import run_rfid

    _export_has_decoder(row.encoder)
    _need_weights(cfg)
    if "m" not in lpips_cache:
        lp = cfg.lpips
        lpips_cache["m"] = None if lp.backbone == "none" else LPIPSMetric(lp.net, lp.backbone, lp.backbone_path,
                                                                         device)
    return run_rfid(row.encoder, cfg.rfid.images, out / "rfid", weights=cfg.fid.weights,
                    max_images=cfg.rfid.max_images, batch_size=cfg.rfid.batch_size, lpips=lpips_cache["m"],
                    cache_dir=cfg.fid.cache_dir or None, kid_subsets=cfg.fid.kid_subsets,
                    fid_batch_size=cfg.fid.batch_size, device=device)


def run_gfid_piece(cfg, row: RowConfig, out: Path, device: str) -> dict:
    from eval import gfid

    _need_weights(cfg)
    g = cfg.gfid
    names, real = None, g.real
    if Path(g.real).is_dir() and all(p.is_dir() for p in Path(g.real).iterdir()):
        names = [d.name for d in gfid.class_folders(g.real)]
        real = gfid.class_real_images(g.real, g.real_per_class)
    found = [p for p in (Path(row.rae) / "samples" / "samples.npz", Path(row.rae) / "samples.npz")
             if row.rae and p.is_file()]
    samples, labels = (found[0] if found else None), None
    if samples is None:
        if not row.rae or not Path(row.rae).is_dir():
            raise Missing(f"no RAE run at {row.rae or '(row.rae not set)'}")
        try:
            gen, gen_names = gfid.load_sampler(g.sampler, row.rae, device, seed=g.seed, steps=g.steps,
                                               cfg_scale=g.cfg_scale)
        except (ImportError, AttributeError) as e:
            raise Missing(f"gfid.sampler {g.sampler} is not available ({e})") from e
        names = list(gen_names) if gen_names else names
        if not names:
            raise Missing("number of classes unknown: gfid.real is not a class-split folder and the sampler gave none")
        samples, labels = gfid.generate_samples(gen, len(names), g.per_class, g.batch_size, g.seed)
        gfid.write_samples_npz(out / "gfid" / "samples.npz", samples, labels)
    return gfid.run_gfid(samples, real, out / "gfid", labels=labels, class_names=names, weights=cfg.fid.weights,
                         cache_dir=cfg.fid.cache_dir or None, kid_subsets=cfg.fid.kid_subsets,
                         batch_size=cfg.fid.batch_size, device=device)


# ---------------------------------------------------------------------------------------------------- driver
def _metrics_files(run_dir: str) -> list[Path]:
    if not run_dir or not Path(run_dir).is_dir():
        return []
    root = Path(run_dir)
    return sorted(p for depth in ("", "*/", "*/*/") for p in root.glob(f"{depth}metrics.jsonl"))


def figures(cfg, out: Path) -> list[str]:
    """Training curves (one PNG per run kind, rows overlaid) + links to the grids."""
    from eval.report import plot_curves
    from ov3common.log import read_jsonl

    figs = []
    for kind, attr in (("encoder", "encoder_run"), ("llava", "llava"), ("rae", "rae")):
        series = []
        for row in cfg.rows:
            for f in _metrics_files(getattr(row, attr)):
                sub = f.parent.relative_to(getattr(row, attr)).as_posix()
                series.append((row.name + ("" if sub == "." else f" / {sub}"), read_jsonl(f)))
        if series and plot_curves(series, out / f"curves_{kind}.png", f"{kind} training curves"):
            figs.append(f"curves_{kind}.png")
    for row in cfg.rows:
        for sub in ("rfid/recon_grid.png", "gfid/samples_grid.png"):
            if (out / slug(row.name) / sub).is_file():
                figs.append(f"{slug(row.name)}/{sub}")
    return figs


def evaluate(cfg) -> dict:
    """Run everything available; returns the summary dict (also written to <out>/summary.{json,md})."""
    from eval.report import TOY_DISCLAIMER, render_markdown
    from ov3common.checkpoint import atomic_write_json, atomic_write_text
    from ov3common.config import to_dict
    from ov3common.log import get_logger

    log = get_logger("eval.eval_all")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, caches, lpips_cache = time.perf_counter(), {}, {}
    rows = []
    for row in cfg.rows:
        rout = out / slug(row.name)
        rout.mkdir(parents=True, exist_ok=True)
        entry: dict = {"name": row.name, "slug": slug(row.name), "encoder": row.encoder, "results": {},
                       "missing": {}, "errors": {}, "seconds": {}}
        for piece in cfg.pieces:
            t = time.perf_counter()
            try:
                if piece in ("pope", "seedbench", "seedbench_rank"):
                    res = run_understanding(piece, cfg, row, rout, device, caches)
                elif piece == "rfid":
                    res = run_rfid_piece(cfg, row, rout, device, lpips_cache)
                elif piece == "gfid":
                    res = run_gfid_piece(cfg, row, rout, device)
                else:
                    raise ValueError(f"pieces: unknown piece {piece!r} (seedbench | seedbench_rank | pope | gfid | rfid)")
                entry["results"][piece] = res
                log.info("%s / %s: done in %.0f s", row.name, piece, time.perf_counter() - t)
            except Missing as e:
                entry["missing"][piece] = str(e)
                log.info("%s / %s: — (%s)", row.name, piece, e)
            except Exception as e:  # one failing piece must not hide the others: recorded and reported
                entry["errors"][piece] = f"error: {type(e).__name__}: {e}"
                log.error("%s / %s failed:\n%s", row.name, piece, traceback.format_exc())
            entry["seconds"][piece] = round(time.perf_counter() - t, 1)
        for kind in ("predict", "rank"):
            caches.pop((kind, row.llava), None)  # free this row's LLaVA models
        rows.append(entry)
    summary = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "toy": cfg.toy,
               "disclaimer": TOY_DISCLAIMER if cfg.toy else "", "pope_parser": cfg.pope.parser, "rows": rows,
               "config": to_dict(cfg), "command": "python -m eval.eval_all " + " ".join(sys.argv[1:])}
    summary["figures"] = figures(cfg, out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary))
    log.info("wrote %s and %s (%.0f s)", out / "summary.json", out / "summary.md", summary["seconds"])
    return summary


def main(argv=None) -> int:
    from ov3common.config import ConfigError, parse_cli

    try:
        cfg = parse_cli(EvalAllConfig, argv, default_config="configs/eval/toy.yaml")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = evaluate(cfg)
    return 1 if any(r["errors"] for r in summary["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
