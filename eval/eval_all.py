"""``make eval-all``: run every evaluation that is available, for every encoder row, into one report.

    python -m eval.eval_all --config configs/eval/toy.yaml [key=value ...]

For each row (an encoder and the LLaVA / RAE runs built on it; by default OV3 and the baseline trained with
reconstruction weight 0) it runs, when the inputs exist:
  * SeedBench / POPE: scores ``<llava>/{seedbench,pope}_predictions.jsonl`` if present, else calls the configured
    predictor ``llava.predictor = "module:function"`` (default :func:`eval.adapters.llava_predictor`) as
    ``function(run_dir, device, batch_size=, max_new_tokens=) -> predict`` with ``predict(records) -> list[str]``
    on the records of :mod:`eval.benchmarks`;
  * SeedBench by likelihood ranking (ours; piece ``seedbench_rank``): scores
    ``<llava>/seedbench_rank_predictions.jsonl`` if present, else calls ``llava.ranker`` (default
    :func:`eval.adapters.llava_ranker`) as ``function(run_dir, device, batch_size=) -> predict``;
  * gFID: ``<rae>/samples/samples.npz`` (``make rae-sample``) or ``<rae>/samples.npz`` if present, else the
    configured sampler (default :func:`eval.adapters.rae_sampler`, called as
    ``function(run_dir, device, seed=, steps=, cfg_scale=) -> (generate(labels), class_names)``);
  * rFID + PSNR / SSIM / LPIPS: the encoder export on the rFID image set (:mod:`eval.rfid`).
Anything missing is reported as "—" with the reason; a piece that fails is reported with its error and the
command exits with status 1 after writing the report. Outputs: ``<out>/summary.json``, ``<out>/summary.md``,
``<out>/manifest.json`` (the benchmark files read, with sha256 and row counts, and every row's sampling manifest),
per-row folders (predictions, grids, JSON) and training-curve PNGs from the runs' ``metrics.jsonl``.

Protocol (issue 14): a samples npz is scored only when it holds the number of samples the config asks for
(``gfid.per_class`` x classes) and its sampling manifest (:mod:`rae_generation.manifest`) matches the config's protocol
(seed, and steps / cfg_scale when set); otherwise it is regenerated through ``gfid.sampler`` when the run can
sample (``gfid.regenerate``), else refused with the reason — or scored and marked partial when
``gfid.allow_partial=true``. rFID likewise refuses a set smaller than ``rfid.max_images`` unless
``rfid.allow_partial``. Two rows whose sampling manifests differ in a protocol field are not compared (the report
says so) unless ``compare.allow_protocol_mismatch=true``. Every accuracy / F1 / FID carries a 95% interval
(:mod:`eval.intervals`); the report's comparisons say "no measurable difference" when intervals overlap.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from encoder.export import read_export_config
from eval import benchmarks, gfid, provenance, score
from eval.eval_config import EvalAllConfig, RowConfig
from eval.intervals import Interval, compare
from eval.provenance import identify_reference, sha256_file
from eval.recon import LPIPSMetric
from eval.references import gfid_real, warm_references
from eval.report import TOY_DISCLAIMER, plot_curves, render_markdown
from eval.rfid import run_rfid, select_images
from eval.row_store import reusable_row, store_row
from eval.toygen import toy_metrics
from ov3common.checkpoint import atomic_write_json, atomic_write_text
from ov3common.config import ConfigError, import_object, parse_cli, to_dict
from ov3common.log import get_logger, read_jsonl
from rae_generation.manifest import ManifestError, differences, mismatches, read_manifest


class Missing(Exception):
    """An input of a piece is absent: the piece is shown as '—' with this reason (not an error)."""


class Refused(Missing):
    """The inputs break the protocol (too few samples, a manifest that does not match): not scored."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "row"


# ---------------------------------------------------------------------------------------------------- pieces
def _records(bench: str, cfg, cache: dict) -> list[dict]:
    """The benchmark's records as configured (data type, limit); the whole file is identified once
    (:func:`eval.provenance.identify`: sha256, row counts, variant) into ``cache['identity'][bench]``."""

    bench = "seedbench" if bench.startswith("seedbench") else bench
    bc = getattr(cfg, bench)
    if bench not in cache:
        kw = dict(image_root=bc.image_root or None, split=bc.split)
        full = (benchmarks.load_pope(bc.path, **kw) if bench == "pope"
                else benchmarks.load_seedbench(bc.path, data_type=None, **kw))
        cache.setdefault("identity", {})[bench] = provenance.identify(bench, bc.path, full)
        if bench == "seedbench" and bc.data_type:
            full = [r for r in full if r["data_type"] == bc.data_type]
        cache[bench] = benchmarks.limit_records(full, bc.limit_per_category or None)
    return cache[bench]


def run_understanding(bench: str, cfg, row: RowConfig, out: Path, device: str, cache: dict) -> dict:
    found = Path(row.llava) / f"{bench}_predictions.jsonl" if row.llava else None
    have_preds = found is not None and found.is_file()
    factory = None
    rank = bench == "seedbench_rank"
    base = "seedbench" if bench.startswith("seedbench") else bench
    if not have_preds and bench == "seedbench_blind":  # the blind control: predictions on blank images only
        raise Missing(f"no {found} (make llava-predict writes it: --blank-image)")
    if not have_preds:
        if not row.llava or not Path(row.llava).is_dir():
            raise Missing(f"no LLaVA run at {row.llava or '(row.llava not set)'}")
        what, spec = ("llava.ranker", cfg.llava.ranker) if rank else ("llava.predictor", cfg.llava.predictor)
        try:
            factory = import_object(spec, what)
        except (ImportError, ConfigError) as e:
            raise Missing(f"{what} {spec} is not available ({e})") from e
    try:  # identifies the benchmark file (sha256, rows, variant) even when predictions exist
        records = _records(bench, cfg, cache)
    except benchmarks.BenchmarkError as e:
        if not have_preds:
            raise
        records, cache.setdefault("identity", {})[bench.replace("_rank", "")] = None, {
            "kind": bench, "path": str(getattr(cfg, base).path), "warning":
            f"the benchmark file could not be read, so the scored predictions are not identified: {e}"}
    if have_preds:
        preds = found
    else:
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
    identity = cache["identity"][base]
    result["benchmark_file"] = {k: identity.get(k) for k in ("path", "sha256", "rows", "variant", "warning")}
    if records is not None:
        expected = {r["question_id"] for r in records}
        scored = {str(r["question_id"]) for r in score.read_predictions(preds, ("question_id",))}
        if scored != expected:
            result["question_mismatch"] = (f"{preds}: {len(scored)} questions, the configured benchmark has "
                                           f"{len(expected)} ({len(expected - scored)} missing, "
                                           f"{len(scored - expected)} not in it)")

    atomic_write_json(out / f"{bench}_scores.json", result)
    return result


def _need_weights(cfg) -> None:
    if not Path(cfg.fid.weights).is_file():
        raise Missing(f"Inception weights {cfg.fid.weights} missing (run `make fid-weights`)")


def _export_has_decoder(path: str) -> None:
    if not path or not (Path(path) / "config.json").is_file():
        raise Missing(f"no encoder export at {path or '(row.encoder not set)'}")
    if read_export_config(path)["decoder"] is None:
        raise Missing("the encoder export has no ViT decoder (decode unavailable)")


def run_rfid_piece(cfg, row: RowConfig, out: Path, device: str, lpips_cache: dict, cache: dict) -> dict:
    _export_has_decoder(row.encoder)
    _need_weights(cfg)
    rc = cfg.rfid
    paths = select_images(rc.images, rc.max_images)
    partial = None
    if rc.max_images > 0 and len(paths) < rc.max_images:
        partial = f"{rc.images} holds {len(paths)} images; the protocol (rfid.max_images) asks for {rc.max_images}"
        if not rc.allow_partial:
            raise Refused(f"refused: {partial} (set rfid.allow_partial=true to score and mark it)")
    if "rfid_images" not in cache.setdefault("identity", {}):
        cache["identity"]["rfid_images"] = identify_reference(rc.images)
    if "m" not in lpips_cache:
        lp = cfg.lpips
        lpips_cache["m"] = None if lp.backbone == "none" else LPIPSMetric(lp.net, lp.backbone, lp.backbone_path,
                                                                         device)
    res = run_rfid(row.encoder, paths, out / "rfid", weights=cfg.fid.weights, batch_size=rc.batch_size,
                   lpips=lpips_cache["m"], cache_dir=cfg.fid.cache_dir or None, kid_subsets=cfg.fid.kid_subsets,
                   fid_batch_size=cfg.fid.batch_size, device=device, bootstrap=cfg.fid.bootstrap,
                   fused=cfg.fid.fused, precision=cfg.fid.precision)
    if partial:
        res["partial"] = partial
    return res


def _gfid_protocol(cfg, num_classes: int) -> dict:
    """The manifest fields the config fixes (steps / cfg_scale only when set: otherwise the run's defaults)."""
    g = cfg.gfid
    exp = {"per_class": g.per_class, "num_classes": num_classes, "num_samples": g.per_class * num_classes,
           "class_balance": "balanced", "seed": g.seed}
    if g.steps > 0:
        exp["steps"] = g.steps
    if g.cfg_scale >= 0:
        exp["cfg_scale"] = float(g.cfg_scale)
    return exp


def _check_samples(npz: Path, expected: dict) -> tuple[list[str], dict | None]:
    """Why a found samples file cannot be scored under the protocol ([] = it can), and its manifest."""


    with np.load(npz, allow_pickle=False) as z:
        n = int(z["arr_0"].shape[0]) if "arr_0" in z.files else 0
    problems = []
    if n < expected["num_samples"]:
        problems.append(f"{npz} has {n} samples; the protocol asks for {expected['num_samples']} "
                        f"({expected['per_class']} per class x {expected['num_classes']} classes)")
    try:
        manifest = read_manifest(npz)
    except ManifestError as e:
        return problems + [str(e)], None
    if manifest is None:
        problems.append(f"{npz} has no sampling manifest ({npz.stem}.manifest.json)")
    else:
        bad = mismatches(manifest, expected)
        if bad:
            problems.append(f"{npz}'s manifest differs from the protocol: " + ", ".join(
                f"{k} {found!r} (protocol {want!r})" for k, (found, want) in bad.items()))
    return problems, manifest


def run_gfid_piece(cfg, row: RowConfig, out: Path, device: str, cache: dict) -> dict:
    _need_weights(cfg)
    g = cfg.gfid
    names, real = gfid_real(g)
    if "gfid_reference" not in cache.setdefault("identity", {}):
        cache["identity"]["gfid_reference"] = identify_reference(g.real)
    found = [p for p in (Path(row.rae) / "samples" / "samples.npz", Path(row.rae) / "samples.npz")
             if row.rae and p.is_file()]
    samples, labels, partial = (found[0] if found else None), None, None
    can_sample = bool(row.rae) and Path(row.rae).is_dir() and (
        g.sampler != "eval.adapters:rae_sampler" or (Path(row.rae) / "generator.json").is_file())
    if samples is not None:
        if names:
            n_cls = len(names)
        else:  # an ADM reference: the class count comes from the run (generator.json) or the samples' manifest
            spec = Path(row.rae) / "generator.json"
            n_cls = len(json.loads(spec.read_text())["classes"]) if spec.is_file() else None
        if n_cls is None:
            n_cls = (read_manifest(samples) or {}).get("num_classes") or 0
        problems, _ = _check_samples(samples, _gfid_protocol(cfg, n_cls))
        if not n_cls:
            problems.insert(0, "the number of classes is unknown (no class-split gfid.real, generator.json or manifest)")
        if problems and g.regenerate and can_sample:
            samples = None  # regenerated below, under the protocol
        elif problems and g.allow_partial:
            partial = "; ".join(problems)
        elif problems:
            raise Refused("refused: " + "; ".join(problems) + " (set gfid.allow_partial=true to score and mark it, "
                          "or make it regenerable: a run folder with generator.json)")
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
        images, labels = gfid.generate_samples(gen, len(names), g.per_class, g.batch_size, g.seed)
        samples = gfid.write_generated(out / "gfid" / "samples.npz", images, labels, gen, g.seed, names)
    res = gfid.run_gfid(samples, real, out / "gfid", labels=labels, class_names=names, weights=cfg.fid.weights,
                        cache_dir=cfg.fid.cache_dir or None, kid_subsets=cfg.fid.kid_subsets,
                        batch_size=cfg.fid.batch_size, device=device, bootstrap=cfg.fid.bootstrap,
                        fused=cfg.fid.fused, precision=cfg.fid.precision)
    if partial:
        res["partial"] = partial
    return res


def run_toygen_piece(cfg, row: RowConfig, out: Path) -> dict:
    """Toy FID + class accuracy of ``<rae>/samples/samples.npz`` (make rae-sample) in the feature space of the pixel
    classifier ``toygen.classifier`` (make rae-classacc), against the real class split ``gfid.real``:
    :mod:`eval.toygen`."""
    samples = Path(row.rae or ".") / "samples" / "samples.npz"
    if not row.rae or not samples.is_file():
        raise Missing(f"no {samples} (make rae-sample)")
    if not (Path(cfg.toygen.classifier) / "pixels.safetensors").is_file():
        raise Missing(f"no pixel classifier in {cfg.toygen.classifier} (make rae-classacc)")
    res = toy_metrics(cfg.toygen.classifier, samples, cfg.gfid.real, cfg.toygen.image_size, cfg.toygen.bootstrap)
    atomic_write_json(out / "toygen.json", res)
    return res


def compare_rows(rows: list[dict], allow_mismatch: bool = False) -> list[dict]:
    """Every pair (first row vs each other row) for every metric with an interval: "no measurable difference" when
    the 95% intervals overlap; gFID pairs whose sampling manifests differ in a protocol field are refused."""

    metrics = [("SeedBench (img)", "seedbench", ("intervals", "image"), True),
               ("SeedBench blind control (blank image)", "seedbench_blind", ("intervals", "image"), True),
               ("SeedBench rank", "seedbench_rank", ("intervals", "image"), True),
               ("POPE F1 (mean of categories)", "pope", ("intervals", "mean_f1"), True),
               ("POPE acc (mean of categories)", "pope", ("intervals", "mean_accuracy"), True),
               ("gFID", "gfid", ("fid_interval",), False),
               ("toy FID (classifier features)", "toygen", ("toy_fid_interval",), False),
               ("class accuracy of samples", "toygen", ("class_acc_interval",), True),
               ("rFID", "rfid", ("fid_interval",), False),
               ("PSNR", "rfid", ("intervals", "psnr"), True), ("SSIM", "rfid", ("intervals", "ssim"), True),
               ("LPIPS", "rfid", ("intervals", "lpips"), False)]

    def interval(row: dict, piece: str, path: tuple[str, ...]) -> Interval | None:
        d = row.get("results", {}).get(piece)
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return Interval.from_dict(d)

    out = []
    for other in rows[1:]:
        a_row = rows[0]
        for label, piece, path, higher in metrics:
            a, b = interval(a_row, piece, path), interval(other, piece, path)
            if a is None or b is None:
                continue
            entry = {"metric": label, "a": a_row["name"], "b": other["name"], "a_interval": a.to_dict(),
                     "b_interval": b.to_dict()}
            if piece == "gfid":
                diff = differences(a_row["results"]["gfid"].get("manifest"), other["results"]["gfid"].get("manifest"))
                if diff and not allow_mismatch:
                    entry["verdict"] = "not compared: sampling manifests differ in " + ", ".join(
                        f"{k} ({x!r} vs {y!r})" for k, (x, y) in diff.items())
                    out.append(entry)
                    continue
                if diff:
                    entry["protocol_differences"] = {k: list(v) for k, v in diff.items()}
            verdict = compare(a, b, higher_is_better=higher)
            entry["verdict"] = {"first better": f"{a_row['name']} better", "second better": f"{other['name']} better"
                                }.get(verdict, verdict)
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------- driver
def _metrics_files(run_dir: str) -> list[Path]:
    if not run_dir or not Path(run_dir).is_dir():
        return []
    root = Path(run_dir)
    return sorted(p for depth in ("", "*/", "*/*/") for p in root.glob(f"{depth}metrics.jsonl"))


def figures(cfg, out: Path) -> list[str]:
    """Training curves (one PNG per run kind, rows overlaid) + links to the grids."""

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


def run_manifest(summary: dict, cfg) -> dict:
    """What this evaluation read: benchmark files (sha256, rows, variant), the Inception weights, and every row's
    sampling manifest and reference-statistics hashes."""

    w = Path(cfg.fid.weights)
    rows = {}
    for r in summary["rows"]:
        res = r.get("results", {})
        rows[r["name"]] = {
            "gfid_sampling": (res.get("gfid") or {}).get("manifest"),
            "gfid_ref_stats_sha256": (res.get("gfid") or {}).get("ref_stats_sha256"),
            "rfid_ref_stats_sha256": (res.get("rfid") or {}).get("ref_stats_sha256"),
            "n": {k: v.get("n") for k, v in res.items() if isinstance(v, dict) and "n" in v}}
    return {"generated_at": summary["generated_at"], "benchmarks": summary["benchmarks"],
            "inception_weights": {"path": str(w), "sha256": sha256_file(w) if w.is_file() else None},
            "rows": rows}


def evaluate(cfg) -> dict:
    """Run everything available; returns the summary dict (also written to <out>/summary.{json,md})."""

    log = get_logger("eval.eval_all")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    needs = {"pope": ("pope", "path"), "seedbench": ("seedbench", "path"), "seedbench_rank": ("seedbench", "path"),
             "rfid": ("rfid", "images")}
    for piece in cfg.pieces:
        section, name = needs.get(piece, (None, None))
        if section and not getattr(getattr(cfg, section), name):
            raise ConfigError(f"{section}.{name}: required for piece {piece!r} (the benchmark's local path; no default)")
    if not cfg.rows:
        raise ConfigError("rows: empty (one row per encoder: name, encoder, encoder_run, llava, rae)")
    known = {r.name for r in cfg.rows} | {slug(r.name) for r in cfg.rows}
    for name in cfg.only:
        if name not in known:
            raise ConfigError(f"only: no row named {name!r} (rows: {', '.join(r.name for r in cfg.rows)})")
    if cfg.references_only:
        warm_references(cfg, device)
        return {"rows": []}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, caches, lpips_cache = time.perf_counter(), {}, {}
    rows = []
    for row in cfg.rows:
        if cfg.only and row.name not in cfg.only and slug(row.name) not in cfg.only:
            continue
        rout = out / slug(row.name)
        rout.mkdir(parents=True, exist_ok=True)
        if not cfg.only and cfg.reuse_rows and (stored := reusable_row(rout / "row.json", cfg, row)):
            for k, v in stored["identity"].items():
                caches.setdefault("identity", {}).setdefault(k, v)
            rows.append({**stored["entry"], "reused": str(rout / "row.json")})
            log.info("%s: reused %s (inputs, settings and code unchanged)", row.name, rout / "row.json")
            continue
        entry: dict = {"name": row.name, "slug": slug(row.name), "encoder": row.encoder, "results": {},
                       "missing": {}, "errors": {}, "seconds": {}}
        for piece in cfg.pieces:
            t = time.perf_counter()
            try:
                if piece in ("pope", "seedbench", "seedbench_rank", "seedbench_blind"):
                    res = run_understanding(piece, cfg, row, rout, device, caches)
                elif piece == "rfid":
                    res = run_rfid_piece(cfg, row, rout, device, lpips_cache, caches)
                elif piece == "gfid":
                    res = run_gfid_piece(cfg, row, rout, device, caches)
                elif piece == "toygen":
                    res = run_toygen_piece(cfg, row, rout)
                else:
                    raise ValueError(f"pieces: unknown piece {piece!r} "
                                     "(seedbench | seedbench_rank | seedbench_blind | pope | gfid | toygen | rfid)")
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
        if cfg.only:
            store_row(rout / "row.json", cfg, row, entry, caches.get("identity", {}))
    if cfg.only:
        log.info("rows %s stored for a later full run (%.0f s)", ", ".join(r["slug"] for r in rows),
                 time.perf_counter() - t0)
        return {"rows": rows}
    summary = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "toy": cfg.toy,
               "disclaimer": TOY_DISCLAIMER if cfg.toy else "", "pope_parser": cfg.pope.parser, "rows": rows,
               "benchmarks": caches.get("identity", {}),
               "comparisons": compare_rows(rows, cfg.compare.allow_protocol_mismatch),
               "config": to_dict(cfg), "command": "python -m eval.eval_all " + " ".join(sys.argv[1:])}
    summary["figures"] = figures(cfg, out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    for ident in summary["benchmarks"].values():
        if ident.get("warning"):
            log.warning("%s", ident["warning"])
    atomic_write_json(out / "manifest.json", run_manifest(summary, cfg))
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary))
    log.info("wrote %s and %s (%.0f s)", out / "summary.json", out / "summary.md", summary["seconds"])
    return summary


def main(argv=None) -> int:
    try:
        cfg = parse_cli(EvalAllConfig, argv, default_config="configs/eval/toy.yaml")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = evaluate(cfg)
    return 1 if any(r["errors"] for r in summary["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
