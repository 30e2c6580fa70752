"""`make demo`'s runner: the toy chain as phases of parallel lanes, each step one ``make`` run, timed.

    python -m ov3common.demo --make make --out reports \\
        --phase "data" \\
        --phase "toy-llm || toy-vae ; pretrain-encoder NPROC=1 ; pretrain-encoder-baseline NPROC=1" ...

A phase is one or more lanes separated by ``||``; a lane is one or more steps separated by ``;``; a step is the
arguments of one ``make`` run (targets and ``VAR=value``). The lanes of a phase run at the same time (the toy
stages are single-threaded processes, so two lanes keep two cores busy where one ``NPROC=2`` run of a tiny model
spends much of its time in DDP); the steps of a lane run one after the other; a phase starts when the previous one
is done. Each lane's output goes to ``<out>/demo_logs/<phase>-<lane>.log`` (one phase with one lane: the console).
``<out>/demo_timings.tsv`` gets one row per step (its wall seconds, its lane) and one ``phase`` row per phase
(the phase's wall seconds: the sum of the phase rows is the chain's time). A failed step stops its lane; the other
lanes of the phase finish, then the runner prints the failed lane's log tail and exits with the step's status.

``--serial`` runs the lanes of a phase one after the other (a machine with one core, or a shared one where a run
should hold one core only) and adds a ``phase N, lanes in parallel`` row per phase: the longest lane's seconds,
what the phase takes when each lane has a core of its own (the steps are one-thread processes).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TAIL_LINES = 40


@dataclass
class Lane:
    steps: list[list[str]]  # make arguments of each step
    rows: list[tuple[str, float]] = field(default_factory=list)  # (step label, seconds) of the steps that ran
    failed: int = 0  # exit status of the failed step (0 = none)


def parse_phase(text: str) -> list[Lane]:
    """``"a b X=1 ; c || d"`` → two lanes: [[a, b, X=1], [c]] and [[d]] (a ``;`` with nothing after it is
    ignored); a lane without a step is an error."""
    lanes = []
    for lane in text.split("||"):
        steps = [shlex.split(s) for s in lane.split(";") if s.strip()]
        if not steps:
            raise ValueError(f"a lane without a step in phase {text!r}")
        lanes.append(Lane(steps))
    return lanes


def label(args: list[str]) -> str:
    """A step's name in the timings: its targets, ``(baseline)`` when a variable names a baseline config."""
    targets = [a for a in args if "=" not in a]
    settings = [a for a in args if "=" in a and not a.startswith(("NPROC=", "ARGS="))]
    name = " ".join(targets)
    return name + (" (baseline)" if any(re.search(r"baseline", s) for s in settings) else "")


def run_lane(lane: Lane, make: list[str], log: Path | None, tag: str) -> None:
    out = open(log, "w") if log else None
    try:
        for args in lane.steps:
            print(f"== {tag}make {' '.join(args)}", flush=True)
            if out:
                out.write(f"== make {' '.join(args)}\n")
                out.flush()
            t0 = time.time()
            rc = subprocess.run([*make, "--no-print-directory", *args], stdout=out, stderr=subprocess.STDOUT if out
                                else None).returncode
            lane.rows.append((label(args), time.time() - t0))
            if rc:
                lane.failed = rc
                return
    finally:
        if out:
            out.close()


def run(phases: list[str], make: list[str], out_dir: Path, serial: bool = False) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "demo_logs"
    tsv = out_dir / "demo_timings.tsv"
    tsv.write_text("step\tlane\tseconds\n")
    t_start, projected = time.time(), 0.0
    for p, text in enumerate(phases, 1):
        lanes = parse_phase(text)
        if len(lanes) > 1:
            logs.mkdir(exist_ok=True)
        t0 = time.time()
        threads = []
        for i, lane in enumerate(lanes, 1):
            log = logs / f"phase{p}-lane{i}.log" if len(lanes) > 1 else None
            tag = f"[phase {p} lane {i}] " if len(lanes) > 1 else ""
            threads.append(threading.Thread(target=run_lane, args=(lane, make, log, tag)))
            threads[-1].start()
            if serial:
                threads[-1].join()
                if lane.failed:
                    break
        for t in threads:
            t.join()
        with tsv.open("a") as f:
            for i, lane in enumerate(lanes, 1):
                for name, sec in lane.rows:
                    f.write(f"{name}\t{p}.{i}\t{sec:.1f}\n")
            f.write(f"phase {p}\t{p}\t{time.time() - t0:.1f}\n")
            longest = max(sum(sec for _, sec in lane.rows) for lane in lanes)
            projected += longest if serial else time.time() - t0
            if serial and len(lanes) > 1:
                f.write(f"phase {p}, lanes in parallel\t{p}\t{longest:.1f}\n")
        for i, lane in enumerate(lanes, 1):
            if lane.failed:
                if len(lanes) > 1:
                    log = logs / f"phase{p}-lane{i}.log"
                    tail = log.read_text().splitlines()[-TAIL_LINES:]
                    print(f"demo: phase {p} lane {i} failed; the end of {log}:", *tail, sep="\n", file=sys.stderr)
                return lane.failed
    with tsv.open("a") as f:
        f.write(f"total\t-\t{time.time() - t_start:.1f}\n")
        if serial:
            f.write(f"total, lanes in parallel\t-\t{projected:.1f}\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ov3common.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", default="make", help="the make command (the Makefile passes $(MAKE))")
    ap.add_argument("--out", default="reports", help="folder of demo_timings.tsv and demo_logs/")
    ap.add_argument("--phase", action="append", required=True, help="lanes separated by ||, steps by ;")
    ap.add_argument("--serial", action="store_true", help="run the lanes of a phase one after the other")
    a = ap.parse_args(argv)
    for text in a.phase:
        parse_phase(text)  # every phase is checked before anything runs
    return run(a.phase, shlex.split(a.make), Path(a.out), a.serial)


if __name__ == "__main__":
    sys.exit(main())
