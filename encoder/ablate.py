"""The paper's encoder ablations at toy scale (``make ablate-encoder``): noise scale τ, loss ratio ω_und/ω_rec and
branch isolation (reconstruction only / understanding only / both). Short runs of the real trainer, one process;
writes ``table.md`` / ``results.json`` and ``losses.png`` (loss curves per group) under ``out_dir``.

A disabled branch (weight 0) is still computed and logged (measured, not optimised). Toy numbers check the
pipeline and the direction of effects; they are not paper numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from encoder.train import Config, train
from ov3common.checkpoint import atomic_write_json, atomic_write_text
from ov3common.config import load_config, parse_cli, path_field
from ov3common.log import get_logger, read_jsonl

LOSSES = ("caption", "contrastive", "pixel_l1", "latent_l1")


@dataclass
class AblateConfig:
    base_config: str = path_field("configs/encoder/ablate.yaml", "file")
    out_dir: str = "runs/toy/ablate"
    taus: list[float] = field(default_factory=lambda: [0.0, 0.4, 0.8, 1.2])
    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # ω_und / ω_rec, ω_rec = 1
    branches: list[str] = field(default_factory=lambda: ["rec", "und", "both"])
    overrides: list[str] = field(default_factory=list)  # applied to every run (e.g. data.root=...)


def plan(cfg: AblateConfig) -> list[tuple[str, str, list[str]]]:
    """(group, label, overrides) per run; identical settings are run once and shared between groups."""
    runs = [("tau", f"tau={t:g}", [f"loss.tau={t}"]) for t in cfg.taus]
    runs += [("ratio", f"und/rec={r:g}", [f"loss.w_und={r}", "loss.w_rec=1.0"]) for r in cfg.ratios]
    branch = {"rec": ["loss.w_und=0.0"], "und": ["loss.w_rec=0.0"], "both": []}
    for b in cfg.branches:
        if b not in branch:
            raise ValueError(f"branches: {b!r} not in {sorted(branch)}")
        runs.append(("branch", f"{b}-only" if b != "both" else "both", branch[b]))
    return runs


def canonical(ov: list[str], default_tau: float, default_ratio: float) -> tuple:
    d = {"loss.tau": default_tau, "loss.w_und": default_ratio, "loss.w_rec": 1.0}
    for o in ov:
        k, v = o.split("=", 1)
        d[k] = float(v)
    return tuple(sorted(d.items()))


def final_losses(metrics: Path, last: int = 3) -> dict[str, float]:
    rows = [r for r in read_jsonl(metrics) if "loss" in r]
    return {k: sum(r[k] for r in rows[-last:]) / len(rows[-last:]) for k in LOSSES if k in rows[-1]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["tau", "ratio", "branch"]
    fig, axes = plt.subplots(len(groups), len(LOSSES), figsize=(4 * len(LOSSES), 3 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        for li, loss in enumerate(LOSSES):
            ax = axes[gi][li]
            for r in (r for r in results if r["group"] == g):
                rows = [x for x in read_jsonl(Path(r["run_dir"]) / "metrics.jsonl") if loss in x]
                ax.plot([x["step"] for x in rows], [x[loss] for x in rows], label=r["label"])
            ax.set_title(f"{g}: {loss}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("OV3 encoder ablations (toy world; pipeline check, not paper numbers)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: list[dict]) -> str:
    head = "| group | setting | val PSNR (dB) | R@1 i→t | " + " | ".join(LOSSES) + " |"
    lines = [head, "|" + " --- |" * (4 + len(LOSSES))]
    for r in results:
        vals = " | ".join(f"{r['losses'].get(k, float('nan')):.4f}" for k in LOSSES)
        lines.append(f"| {r['group']} | {r['label']} | {r['psnr']:.2f} | {r['r1']:.3f} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_cli(AblateConfig, argv)
    log = get_logger("encoder.ablate")
    out = Path(cfg.out_dir)
    base = load_config(Config, cfg.base_config, list(cfg.overrides))
    d_tau, d_ratio = float(base.loss.tau), float(base.loss.w_und / base.loss.w_rec)
    done: dict[tuple, dict] = {}
    results = []
    for group, label, ov in plan(cfg):
        key = canonical(ov, d_tau, d_ratio)
        if key not in done:
            name = f"run{len(done):02d}"
            run_dir = out / name
            log.info("ablation %s (%s): %s", name, label, ov)
            summary = train(load_config(Config, cfg.base_config,
                                        [*cfg.overrides, *ov, f"out_dir={run_dir}", "export_dir=none"]))
            done[key] = {"run_dir": str(run_dir), "psnr": summary["val/psnr"], "r1": summary["val/r1_i2t"],
                         "r1_chance": summary["val/r1_chance"], "losses": final_losses(run_dir / "metrics.jsonl"),
                         "overrides": ov}
        results.append({"group": group, "label": label, **done[key]})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", table(results))
    plot(results, out / "losses.png")
    print(table(results))
    log.info("wrote %s, %s, %s", out / "table.md", out / "results.json", out / "losses.png")
    return results


if __name__ == "__main__":
    main()
