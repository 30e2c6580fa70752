"""Rendering of ``reports/summary.md`` and the training-curve figures from the summary dict of :mod:`eval.eval_all`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from eval.intervals import Interval
from eval.recon import RANDOM_LABEL
from ov3common.checkpoint import atomic_write
from rae_generation.manifest import PROTOCOL_FIELDS

TOY_DISCLAIMER = ("Toy-world numbers: they check that the pipeline runs end to end on tiny models and tiny sets; "
                  "they are not, and must never be presented as, paper numbers.")
COLUMNS = ("Encoder", "SeedBench (img)", "SeedBench blind", "SeedBench rank", "POPE F1", "POPE acc", "gFID", "toy FID", "class acc",
           "rFID", "PSNR", "SSIM", "LPIPS")
CURVE_SKIP = {"step", "epoch", "samples", "time", "elapsed", "consumed", "tokens"}


def _num(v: object, digits: int, scale: float = 1.0) -> str | None:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return f"{v * scale:.{digits}f}"
    return None


def _with_interval(v: object, iv: object, digits: int, scale: float = 1.0) -> str | None:
    """``12.3 [10.1, 14.5]`` when the 95% interval is known, else the point value."""

    point = _num(v, digits, scale)
    i = Interval.from_dict(iv if isinstance(iv, dict) else None)
    if point is None or i is None or not all(math.isfinite(x) for x in (i.low, i.high)):
        return point
    return f"{point} [{i.low * scale:.{digits}f}, {i.high * scale:.{digits}f}]"


def row_cells(row: dict, first_note: int = 1) -> tuple[list[str], list[tuple[str, str]]]:
    """Table cells of one row and the (piece, reason) notes for its '—' cells, numbered from ``first_note``."""
    res, missing = row.get("results", {}), {**row.get("missing", {}), **row.get("errors", {})}
    seed, blind, rank, pope, gfid, toygen, rfid = (res.get(k) or {} for k in (
        "seedbench", "seedbench_blind", "seedbench_rank", "pope", "gfid", "toygen", "rfid"))
    riv = rfid.get("intervals", {})
    lp = _with_interval(rfid.get("lpips"), riv.get("lpips"), 3)
    if lp is not None and rfid.get("lpips_random_backbone"):
        lp += " †"
    piv = pope.get("intervals", {})
    values = {
        "seedbench": [_with_interval(seed.get("image"), seed.get("intervals", {}).get("image"), 1, 100)],
        "seedbench_blind": [_with_interval(blind.get("image"), blind.get("intervals", {}).get("image"), 1, 100)],
        "seedbench_rank": [_with_interval(rank.get("image"), rank.get("intervals", {}).get("image"), 1, 100)],
        "pope": [_with_interval(pope.get("mean_f1"), piv.get("mean_f1"), 1, 100),
                 _with_interval(pope.get("mean_accuracy"), piv.get("mean_accuracy"), 1, 100)],
        "gfid": [_with_interval(gfid.get("gfid"), gfid.get("fid_interval"), 2)],
        "toygen": [_with_interval(toygen.get("toy_fid"), toygen.get("toy_fid_interval"), 2),
                   _with_interval(toygen.get("class_acc"), toygen.get("class_acc_interval"), 1, 100)],
        "rfid": [_with_interval(rfid.get("rfid"), rfid.get("fid_interval"), 2),
                 _with_interval(rfid.get("psnr"), riv.get("psnr"), 2),
                 _with_interval(rfid.get("ssim"), riv.get("ssim"), 3), lp],
    }
    cells, notes = [row["name"]], []
    for piece in values:
        vals = values[piece]
        if all(v is None for v in vals):
            reason = missing.get(piece, "not available")
            notes.append((piece, reason))
            mark = f"—[{first_note + len(notes) - 1}]"
            cells += [mark] * len(vals)
        else:
            if piece == "rfid" and vals[3] is None:
                notes.append(("lpips", rfid.get("lpips_note", "not computed")))
                vals = vals[:3] + [f"—[{first_note + len(notes) - 1}]"]
            flag = (res.get(piece) or {}).get("partial") or (res.get(piece) or {}).get("question_mismatch")
            if flag:
                notes.append((piece, f"PARTIAL (not the protocol's set): {flag}"))
                vals = [f"{vals[0]} ‡[{first_note + len(notes) - 1}]"] + vals[1:]
            cells += [v if v is not None else "—" for v in vals]
    return cells, notes


def render_markdown(summary: dict) -> str:
    """One table (encoder, SeedBench, POPE F1/acc, gFID, rFID, PSNR, SSIM, LPIPS) plus notes and figures."""
    lines = ["# OpenVision 3 — evaluation summary", ""]
    if summary.get("toy"):
        lines += [f"> **{TOY_DISCLAIMER}**", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    all_notes: list[tuple[str, str, str]] = []
    for row in summary["rows"]:
        cells, notes = row_cells(row, len(all_notes) + 1)
        lines.append("| " + " | ".join(cells) + " |")
        all_notes += [(row["name"], piece, reason) for piece, reason in notes]
    lines += ["", "SeedBench: accuracy (%) on image questions, the model writing the option's letter (LLaVA-1.5's "
              "protocol; scored by lmms-eval's rule: first character, case-insensitive); SeedBench blind: the same "
              "model and prompts with every image replaced by a uniform grey one (the blind control: what the "
              "model gets right without seeing; chance 25); SeedBench rank: likelihood ranking (ours) — each "
              "choice's text is scored by the sum of its tokens' log-probabilities (no `</s>`) as the answer to "
              "the bare question with the short-answer suffix, and the highest wins; close in spirit to "
              "SEED-Bench's likelihood evaluation and lmms-eval's `seedbench_ppl`, but matching neither's prompt "
              "exactly, so not comparable with their numbers; "
              "POPE: the mean over adversarial/popular/random of F1 and of accuracy (%) — LLaVA-1.5's number, "
              "not lmms-eval's pooled one (in the details) — parser "
              f"`{summary.get('pope_parser', 'llava')}`; gFID / rFID: FID as ADM reports it (Inception pool3, "
              "torch-fidelity, fp32); toy FID / class acc (toy world only, `make rae-classacc`): the Fréchet distance "
              "between the generated samples and the real val class split in the pooled features of a small CNN "
              "trained on the toy world's 64 classes (Inception features of 64 px flat shapes carry little class "
              "signal), and that CNN's top-1 class accuracy (%) on the decoded samples (chance 1.6); PSNR (dB) / SSIM (Gaussian 11x11, sigma 1.5, data range 1) / LPIPS: "
              "reconstructions of the rFID set (τ = 0).",
              "", "Brackets: 95% intervals — accuracies by the Wilson score interval, F1 and mean accuracy by a "
              "percentile bootstrap over questions (stratified by category), FID by a percentile bootstrap over "
              "the generated / reconstructed samples with the reference statistics fixed (resampling duplicates "
              "images, which raises FID: the interval may sit above the point value). Rows are compared only "
              "through these intervals (see Comparisons)."]
    if any(r.get("results", {}).get("rfid", {}) and r["results"]["rfid"].get("lpips_random_backbone")
           for r in summary["rows"]):
        lines += ["", f"† LPIPS with a {RANDOM_LABEL} (no local torchvision backbone weights)."]
    if all_notes:
        lines += ["", "## Missing values", ""]
        lines += [f"- [{i}] {name} / {piece}: {reason}" for i, (name, piece, reason) in enumerate(all_notes, 1)]
    lines += _comparisons(summary)
    lines += _benchmarks(summary)
    lines += _manifests(summary)
    details = _details(summary)
    if details:
        lines += ["", "## Details", ""] + details
    if summary.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{f}]({f})" for f in summary["figures"]]
    lines += ["", f"Generated {summary.get('generated_at', '')} in {summary.get('seconds', 0):.0f} s "
              f"with `{summary.get('command', 'make eval-all')}`.", ""]
    return "\n".join(lines)


def _comparisons(summary: dict) -> list[str]:
    comps = summary.get("comparisons") or []
    if not comps:
        return []
    out = ["", "## Comparisons (95% intervals; overlap = no measurable difference)", ""]
    for c in comps:
        a, b = c["a_interval"], c["b_interval"]
        out.append(f"- {c['metric']}: {c['a']} {a['value']:.4g} [{a['low']:.4g}, {a['high']:.4g}] vs {c['b']} "
                   f"{b['value']:.4g} [{b['low']:.4g}, {b['high']:.4g}] — **{c['verdict']}**"
                   + (f" (protocol differs, compared on request: {c['protocol_differences']})"
                      if c.get("protocol_differences") else ""))
    return out


def _benchmarks(summary: dict) -> list[str]:
    bench = summary.get("benchmarks") or {}
    if not bench:
        return []
    out = ["", "## Benchmark files", "", "| Input | Path | sha256 | Rows | Variant |", "|---|---|---|---|---|"]
    warnings = []
    for key, b in bench.items():
        variant = b.get("variant") or ("**UNKNOWN**" if b.get("warning") else "—")
        cats = b.get("per_category")
        rows = f"{b.get('rows')}" + (f" {cats}" if cats else "")
        out.append(f"| {key} | `{b.get('path')}` | `{(b.get('sha256') or '')[:16]}…` | {rows} | {variant} |")
        if b.get("warning"):
            warnings.append(b["warning"])
    out += [""] + [f"> **WARNING: {w}**" for w in warnings] if warnings else []
    return out


def _manifests(summary: dict) -> list[str]:
    out = []
    for row in summary.get("rows", []):
        g = (row.get("results", {}).get("gfid") or {})
        m = g.get("manifest")
        r = row.get("results", {}).get("rfid") or {}
        if not (m or g or r):
            continue
        parts = []
        if m:
            parts.append("gFID samples: " + ", ".join(f"{k}={m.get(k)}" for k in PROTOCOL_FIELDS if k in m)
                         + f", checkpoint sha256 {str(m.get('checkpoint_sha256'))[:16]}…, encoder sha256 "
                         f"{str(m.get('encoder_sha256'))[:16]}…")
        elif g:
            parts.append("gFID samples: no sampling manifest")
        if g:
            parts.append(f"gFID n={g.get('n')}, reference statistics sha256 {str(g.get('ref_stats_sha256'))[:16]}…")
        if r:
            parts.append(f"rFID n={r.get('n')}, reference statistics sha256 {str(r.get('ref_stats_sha256'))[:16]}…")
        out.append(f"- {row['name']}: " + "; ".join(parts))
    return (["", "## Sampling manifests and reference statistics", ""] + out) if out else []


def _details(summary: dict) -> list[str]:
    out = []
    for row in summary["rows"]:
        res = row.get("results", {})
        if res.get("pope"):
            cats = res["pope"]["categories"]
            out.append(f"- {row['name']} POPE per category (F1 / acc / yes-ratio): " + "; ".join(
                f"{c} {m['f1'] * 100:.1f} / {m['accuracy'] * 100:.1f} / {m['yes_ratio']:.2f}" for c, m in cats.items()))
            ov, oi = res["pope"]["overall"], res["pope"].get("intervals", {})
            out.append(f"- {row['name']} POPE pooled over all {ov['n']} questions (lmms-eval's number): F1 "
                       f"{_with_interval(ov['f1'], oi.get('overall_f1'), 1, 100)}, acc "
                       f"{_with_interval(ov['accuracy'], oi.get('overall_accuracy'), 1, 100)}")
        for key, what in (("seedbench", "SeedBench"), ("seedbench_rank", "SeedBench rank")):
            if res.get(key):
                cats = res[key].get("categories", {})
                out.append(f"- {row['name']} {what} per category: " + "; ".join(
                    f"{c} {m['accuracy'] * 100:.1f} (n={m['n']})" for c, m in cats.items()
                    if m["accuracy"] is not None))
        for key, what in (("gfid", "gFID"), ("rfid", "rFID")):
            d = (res.get(key) or {}).get("fid_details")
            if d:
                extra = ", ".join(f"{k} {d[k]:.4g}" for k in ("sfid", "inception_score", "precision", "recall",
                                                               "kid_mean") if isinstance(d.get(k), float))
                out.append(f"- {row['name']} {what}: n_fake {d['n_fake']}, n_real {d['n_real']}"
                           + (f", {extra}" if extra else "") + (f"; IS: {d['is_unavailable']}"
                                                                if d.get("is_unavailable") else ""))
    return out


# panels first, in this order (the objective, its two branches, each sub-loss, then LR and throughput)
CURVE_ORDER = ("loss", "rec", "und", "contrastive", "caption", "pixel_l1", "latent_l1", "lpips", "lr",
               "samples_per_s", "grad_norm")
CURVE_MARKERS = ("resolution", "stage")  # a change of one of these is a stage boundary (drawn, not plotted)
CURVE_HIDE = {"eta_s", "logit_scale", "skipped_step"}


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r.get("step", i), r[key]) for i, r in enumerate(rows)
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def curve_keys(series: Sequence[tuple[str, list[dict]]], max_panels: int = 12) -> list[str]:
    """Metric keys worth a panel: numeric, with at least two points in one series (a one-off summary value next to
    curves would draw a near-empty panel; when no key has two points, as after a one-step run, those single points
    are drawn), ordered by :data:`CURVE_ORDER` then by name."""
    counts: dict[str, int] = {}
    for _, rows in series:
        for k in {k for r in rows for k in r}:
            if k not in CURVE_SKIP and k not in CURVE_HIDE and k not in CURVE_MARKERS:
                counts[k] = max(counts.get(k, 0), len(_points(rows, k)))
    least = 2 if any(n >= 2 for n in counts.values()) else 1
    keys = {k for k, n in counts.items() if n >= least}
    rank = {k: i for i, k in enumerate(CURVE_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), k))[:max_panels]


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); ``weight`` from the length when None."""
    if weight is None:
        weight = min(0.9, max(0.0, 1 - 10 / max(len(values), 1)))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def stage_boundaries(rows: list[dict]) -> list[float]:
    """Steps where a :data:`CURVE_MARKERS` key changes value (e.g. the encoder's 128 px -> 256 px stage)."""
    out = []
    for key in CURVE_MARKERS:
        prev = None
        for r in rows:
            if key in r:
                if prev is not None and r[key] != prev:
                    out.append(r.get("step", 0))
                prev = r[key]
    return sorted(set(out))


def plot_curves(series: Sequence[tuple[str, list[dict]]], path: str | Path, title: str,
                max_panels: int = 12) -> Path | None:
    """One panel per metric key (:func:`curve_keys`), one line per (label, rows of metrics.jsonl): the raw values
    faint, their moving average solid, stage boundaries dashed. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    keys = curve_keys(series, max_panels)
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.1 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bounds = sorted({b for _, rows in series for b in stage_boundaries(rows)})
    for ax, key in zip(axes.flat, keys):
        for j, (label, rows) in enumerate(series):
            pts = _points(rows, key)
            if not pts:
                continue
            xs, ys = zip(*pts)
            c = colors[j % len(colors)]
            if len(pts) >= 5:
                ax.plot(xs, ys, color=c, lw=0.8, alpha=0.25)
                ax.plot(xs, smooth(ys), color=c, lw=1.4, label=label)
            else:
                ax.plot(xs, ys, color=c, lw=1.2, marker="o", ms=3, label=label)
        for b in bounds:
            ax.axvline(b, color="0.5", ls="--", lw=0.8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.2)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    note = " (dashed: stage boundary)" if bounds else ""
    fig.suptitle(f"{title}: raw faint, moving average solid{note}", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
