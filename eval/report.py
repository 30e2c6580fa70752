"""Rendering of ``reports/summary.md`` and the training-curve figures from the summary dict of :mod:`eval.eval_all`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from eval.recon import RANDOM_LABEL

TOY_DISCLAIMER = ("Toy-world numbers: they check that the pipeline runs end to end on tiny models and tiny sets; "
                  "they are not, and must never be presented as, paper numbers.")
COLUMNS = ("Encoder", "SeedBench (img)", "SeedBench rank", "POPE F1", "POPE acc", "gFID", "rFID", "PSNR", "SSIM", "LPIPS")
CURVE_SKIP = {"step", "epoch", "samples", "time", "elapsed", "consumed", "tokens"}


def _num(v: object, digits: int, scale: float = 1.0) -> str | None:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return f"{v * scale:.{digits}f}"
    return None


def row_cells(row: dict, first_note: int = 1) -> tuple[list[str], list[tuple[str, str]]]:
    """Table cells of one row and the (piece, reason) notes for its '—' cells, numbered from ``first_note``."""
    res, missing = row.get("results", {}), {**row.get("missing", {}), **row.get("errors", {})}
    seed, rank, pope, gfid, rfid = (res.get(k) or {} for k in ("seedbench", "seedbench_rank", "pope", "gfid", "rfid"))
    lp = _num(rfid.get("lpips"), 3)
    if lp is not None and rfid.get("lpips_random_backbone"):
        lp += " †"
    values = {
        "seedbench": [_num(seed.get("image"), 1, 100)],
        "seedbench_rank": [_num(rank.get("image"), 1, 100)],
        "pope": [_num(pope.get("mean_f1"), 1, 100), _num(pope.get("mean_accuracy"), 1, 100)],
        "gfid": [_num(gfid.get("gfid"), 2)],
        "rfid": [_num(rfid.get("rfid"), 2), _num(rfid.get("psnr"), 2), _num(rfid.get("ssim"), 3), lp],
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
              "protocol); SeedBench rank: the same questions by answer ranking (SEED-Bench's protocol: the most "
              "likely choice text is the answer); POPE: mean over adversarial/popular/random of F1 and "
              f"accuracy (%), parser `{summary.get('pope_parser', 'llava')}`; gFID / rFID: FID (Inception pool3, "
              "torch-fidelity); PSNR (dB) / SSIM / LPIPS: reconstructions of the rFID set (τ = 0)."]
    if any(r.get("results", {}).get("rfid", {}) and r["results"]["rfid"].get("lpips_random_backbone")
           for r in summary["rows"]):
        lines += ["", f"† LPIPS with a {RANDOM_LABEL} (no local torchvision backbone weights)."]
    if all_notes:
        lines += ["", "## Missing values", ""]
        lines += [f"- [{i}] {name} / {piece}: {reason}" for i, (name, piece, reason) in enumerate(all_notes, 1)]
    details = _details(summary)
    if details:
        lines += ["", "## Details", ""] + details
    if summary.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{f}]({f})" for f in summary["figures"]]
    lines += ["", f"Generated {summary.get('generated_at', '')} in {summary.get('seconds', 0):.0f} s "
              f"with `{summary.get('command', 'make eval-all')}`.", ""]
    return "\n".join(lines)


def _details(summary: dict) -> list[str]:
    out = []
    for row in summary["rows"]:
        res = row.get("results", {})
        if res.get("pope"):
            cats = res["pope"]["categories"]
            out.append(f"- {row['name']} POPE per category (F1 / acc / yes-ratio): " + "; ".join(
                f"{c} {m['f1'] * 100:.1f} / {m['accuracy'] * 100:.1f} / {m['yes_ratio']:.2f}" for c, m in cats.items()))
        for key, what in (("seedbench", "SeedBench"), ("seedbench_rank", "SeedBench rank")):
            if res.get(key):
                cats = res[key]["categories"]
                out.append(f"- {row['name']} {what} per category: " + "; ".join(
                    f"{c} {m['accuracy'] * 100:.1f} (n={m['n']})" for c, m in cats.items()
                    if m["accuracy"] is not None))
        for key, what in (("gfid", "gFID"), ("rfid", "rFID")):
            d = (res.get(key) or {}).get("fid_details")
            if d:
                extra = ", ".join(f"{k} {d[k]:.4g}" for k in ("kid_mean", "precision", "recall")
                                  if isinstance(d.get(k), float))
                out.append(f"- {row['name']} {what}: n_fake {d['n_fake']}, n_real {d['n_real']}"
                           + (f", {extra}" if extra else "") + (f"; IS: {d['is_unavailable']}"
                                                                if d.get("is_unavailable") else ""))
    return out


def plot_curves(series: Sequence[tuple[str, list[dict]]], path: str | Path, title: str,
                max_panels: int = 9) -> Path | None:
    """One panel per numeric metric key, one line per (label, rows of metrics.jsonl); None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ov3common.checkpoint import atomic_write

    keys: list[str] = []
    for _, rows in series:
        for r in rows:
            for k, v in r.items():
                if k not in CURVE_SKIP and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    keys = sorted(keys, key=lambda k: ("loss" not in k, k))[:max_panels]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in series:
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
