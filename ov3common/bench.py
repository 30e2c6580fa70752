"""Benchmark plumbing shared by ``encoder.bench``, ``rae_generation.bench`` and ``make bench``.

* :func:`interleaved` times several step functions in alternating rounds (A B C, C B A, ...), so a machine that
  speeds up or slows down during the run moves every contender alike; ratios are taken per round.
* :func:`ratio` summarises two contenders: the median of the per-round ratios (the headline) and its range.
* :func:`machine` records what the numbers depend on (device, threads, load average, torch version).
* ``python -m ov3common.bench report OUT.md A.json B.json ...`` joins the markdown fragments that the benches
  write (key ``"markdown"`` of each JSON) into one report under a header describing the machine.

Tests never assert seconds; they assert that these helpers run and that reports name their sources.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["sync", "interleaved", "ratio", "ratio_text", "machine", "op_profile", "op_profile_markdown", "write_report"]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` rounds, the order reversed every other round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """``a / b`` per round: median (headline), min and max over rounds, and the ratio of the medians."""
    per_round = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "of_medians": statistics.median(a) / statistics.median(b), "rounds": len(per_round)}


def ratio_text(d: dict) -> str:
    """A :func:`ratio` as report text: ``median [min–max]``."""
    return f"{d['median']:.3f} [{d['min']:.2f}–{d['max']:.2f}]"


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; the vendor matters: MKL and oneDNN rank differently on Intel and
    AMD), with the architecture."""
    arch = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {arch}"
    except OSError:
        pass
    return arch


def machine(device: torch.device | str) -> dict:
    """What timings depend on: device name, threads, the 1-min load average before/after is the caller's."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model()
    return {"device": str(dev), "device_name": name, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
            "mkldnn::_linear_pointwise")  # the last: ov3common.linear's oneDNN products


def _op_class(name: str) -> str:
    if name in GEMM_OPS:
        return "matmul (mm, addmm, bmm, baddbmm; oneDNN linear)"
    low = name.lower()
    if "adam" in low or low.startswith("optimizer."):
        return "optimizer (AdamW)"
    if "attention" in low or "softmax" in low:
        return "attention kernels (SDPA, softmax)"
    return name


def op_profile(fns: dict[str, Callable[[], object]], steps: int = 3, warmup: int = 2, top: int = 12,
               device: torch.device | str = "cpu") -> dict:
    """torch.profiler over ``steps`` calls of each function: self time per op class in ms per call (matmuls,
    the optimizer and the attention kernels grouped; every other op by its name), the ``top`` classes of the
    first function and their share of its total, for each contender."""
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                fn()
            sync(device)
        classes: dict[str, float] = {}
        for e in prof.key_averages():
            t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
            classes[_op_class(e.key)] = classes.get(_op_class(e.key), 0.0) + t
        per[name] = classes
    first = next(iter(per.values()))
    order = sorted(first, key=lambda k: -first[k])[:top]
    totals = {n: sum(c.values()) for n, c in per.items()}
    return {"steps": steps, "clock": "device" if cuda else "cpu (self time, all threads' ops on the main thread)",
            "totals_ms": totals,
            "rows": [{"op": k, **{n: per[n].get(k, 0.0) for n in per}} for k in order]}


def op_profile_markdown(prof: dict, title: str) -> list[str]:
    """The profile as a markdown table: ms per step and share of the total for each contender."""
    names = list(prof["totals_ms"])
    lines = [f"**{title}** (torch.profiler, self time per op class, ms per step over {prof['steps']} steps):", "",
             "| op | " + " | ".join(f"{n} ms (%)" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for r in prof["rows"]:
        lines.append(f"| {r['op']} | " + " | ".join(f"{r[n]:.1f} ({100 * r[n] / prof['totals_ms'][n]:.1f})"
                                                   for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{prof['totals_ms'][n]:.1f}**" for n in names) + " |")
    return lines


def write_report(out: str | Path, parts: list[str | Path], title: str = "Benchmarks") -> Path:
    """Join the ``markdown`` fragments of the bench JSONs ``parts`` (in order) into ``out``."""
    blocks, machines = [], []
    for p in parts:
        d = json.loads(Path(p).read_text())
        blocks.append(d["markdown"].rstrip() + f"\n\n_Source: `{p}` (written by `{d.get('command', '?')}`)._\n")
        if "machine" in d:
            m = d["machine"]
            machines.append(f"| `{p}` | {m['device']} ({m['device_name']}) | {m['threads']} | "
                            f"{m.get('load_avg_1m', '?')} → {m.get('load_avg_1m_end', '?')} | {m['torch']} | "
                            f"{m['time']} |")
    head = [f"# {title}", "", "Written by `make bench` (`python -m ov3common.bench report`). Every ratio is the "
            "median over interleaved rounds of one run (each round times every contender once, the order "
            "reversed every other round); the range over rounds is in brackets. Seconds on a shared CPU are "
            "upper bounds; the ratios are the numbers to read.", "",
            "| part | device | threads | load avg (1 min, start → end) | torch | time |", "| --- | --- | --- | --- | --- | --- |",
            *machines, ""]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n" + "\n".join(blocks))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ov3common.bench", description="join bench JSON fragments")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="write a markdown report from bench JSONs")
    rp.add_argument("out")
    rp.add_argument("parts", nargs="+")
    args = ap.parse_args(argv)
    missing = [p for p in args.parts if not Path(p).is_file()]
    if missing:
        print(f"ov3common.bench report: missing bench outputs {missing}", file=sys.stderr)
        return 2
    print(write_report(args.out, args.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
