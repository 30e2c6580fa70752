"""`make demo`'s runner: the toy chain as a graph of ``make`` runs on a few workers, each run timed.

    python -m ov3common.demo --make make --out reports --workers 2 \\
        --job "data | data" \\
        --job "toy-llm | toy-llm | data | 900" \\
        --job "toy-vae | toy-vae | data | 260" \\
        --job "encoder | pretrain-encoder NPROC=1 | toy-vae | 210" ...

A job is ``name | make arguments | the jobs it waits for | estimated seconds`` (the last two fields optional; the
estimate only orders the queue). ``--workers`` jobs run at once (the toy stages are one-thread processes, so two
workers keep two cores busy where one ``NPROC=2`` run of a tiny model spends much of its time in DDP). Whenever a
worker is free it takes, among the jobs whose dependencies are done, the one with the longest estimated path to the
end of the chain (critical-path list scheduling; ties in the order given). Each job's output goes to
``<out>/demo_logs/<name>.log``; the console shows starts, ends and seconds. ``<out>/demo_timings.tsv`` gets one row
per job (worker, start and wall seconds) and a ``total`` row. A failed job stops the chain: no job starts after it,
running jobs finish, then the runner prints the failed job's log tail and exits with its status.

``--workers 1`` (``DEMO_FLAGS=--serial``: a one-core machine, or a shared one where a run should hold one core only)
runs one job at a time and adds a ``total, 2 workers (projected)`` row: the same scheduling replayed on the
measured seconds.
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
class Job:
    name: str
    args: list[str]  # make arguments
    after: list[str] = field(default_factory=list)
    estimate: float = 1.0  # seconds; orders the queue only


def parse_job(text: str) -> Job:
    """``"name | make args | dep dep | 120"`` → a :class:`Job` (dependencies and estimate optional)."""
    parts = [p.strip() for p in text.split("|")]
    if len(parts) < 2 or len(parts) > 4 or not parts[0] or not parts[1]:
        raise ValueError(f"a job is 'name | make arguments [| jobs it waits for [| estimated seconds]]', got {text!r}")
    if not re.fullmatch(r"[\w.+-]+", parts[0]):
        raise ValueError(f"job name {parts[0]!r}: letters, digits and _ . + - only (it names the job's log file)")
    after = parts[2].split() if len(parts) > 2 else []
    try:
        estimate = float(parts[3]) if len(parts) > 3 and parts[3] else 1.0
    except ValueError:
        raise ValueError(f"job {parts[0]!r}: estimated seconds must be a number, got {parts[3]!r}") from None
    return Job(parts[0], shlex.split(parts[1]), after, estimate)


def check_graph(jobs: list[Job]) -> None:
    """Names unique, every dependency a job, no cycle; raises ValueError naming the job."""
    names = [j.name for j in jobs]
    for n in names:
        if names.count(n) > 1:
            raise ValueError(f"job {n!r} is given twice")
    for j in jobs:
        for d in j.after:
            if d not in names:
                raise ValueError(f"job {j.name!r} waits for {d!r}, which is not a job (jobs: {', '.join(names)})")
    done: set[str] = set()
    while len(done) < len(jobs):
        ready = [j.name for j in jobs if j.name not in done and set(j.after) <= done]
        if not ready:
            raise ValueError(f"the jobs {sorted(set(names) - done)} wait for each other (a cycle)")
        done.update(ready)


def critical_path(jobs: list[Job], seconds: dict[str, float] | None = None) -> dict[str, float]:
    """Each job's longest path to the end of the chain (its own seconds included)."""
    cost = {j.name: (seconds or {}).get(j.name, j.estimate) for j in jobs}
    users = {j.name: [k.name for k in jobs if j.name in k.after] for j in jobs}
    memo: dict[str, float] = {}

    def path(n: str) -> float:
        if n not in memo:
            memo[n] = cost[n] + max((path(u) for u in users[n]), default=0.0)
        return memo[n]

    return {j.name: path(j.name) for j in jobs}


def pick(jobs: list[Job], done: set[str], started: set[str], priority: dict[str, float]) -> Job | None:
    """The ready job (dependencies done, not started) with the longest path to the end; ties in the given order."""
    ready = [j for j in jobs if j.name not in started and set(j.after) <= done]
    return max(ready, key=lambda j: priority[j.name], default=None)  # max keeps the first of equals


def simulate(jobs: list[Job], seconds: dict[str, float], workers: int) -> float:
    """Wall seconds of the chain when ``workers`` run the jobs (taking ``seconds`` each) as :func:`run` schedules
    them."""
    priority = critical_path(jobs, seconds)
    done: set[str] = set()
    started: set[str] = set()
    running: list[tuple[float, str]] = []  # (end time, name)
    now = 0.0
    while len(done) < len(jobs):
        while len(running) < workers and (job := pick(jobs, done, started, priority)):
            started.add(job.name)
            running.append((now + seconds[job.name], job.name))
        running.sort()
        now, name = running.pop(0)
        done.add(name)
    return now


def _run_job(job: Job, make: list[str], log: Path, result: dict) -> None:
    with open(log, "w") as out:
        out.write(f"== make {' '.join(job.args)}\n")
        out.flush()
        t0 = time.time()
        rc = subprocess.run([*make, "--no-print-directory", *job.args], stdout=out, stderr=subprocess.STDOUT).returncode
        result[job.name] = (rc, time.time() - t0)


def run(jobs: list[Job], make: list[str], out_dir: Path, workers: int = 2) -> int:
    check_graph(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "demo_logs"
    logs.mkdir(exist_ok=True)
    tsv = out_dir / "demo_timings.tsv"
    tsv.write_text("step\tworker\tstart_s\tseconds\n")
    priority = critical_path(jobs)
    done: set[str] = set()
    started: set[str] = set()
    results: dict[str, tuple[int, float]] = {}
    running: dict[str, tuple[threading.Thread, int, float]] = {}  # name -> (thread, worker, start)
    t_start, failed = time.time(), None
    while running or (failed is None and len(started) < len(jobs)):
        free = [w for w in range(1, workers + 1) if w not in {v[1] for v in running.values()}]
        while failed is None and free and (job := pick(jobs, done, started, priority)):
            worker = free.pop(0)
            started.add(job.name)
            t = threading.Thread(target=_run_job, args=(job, make, logs / f"{job.name}.log", results))
            running[job.name] = (t, worker, time.time() - t_start)
            print(f"[{time.strftime('%H:%M:%S')}] worker {worker}: start {job.name} (make {' '.join(job.args)})",
                  flush=True)
            t.start()
        if not running:
            break
        time.sleep(0.05)
        for name in [n for n in running if n in results]:
            _, worker, start = running.pop(name)
            rc, sec = results[name]
            with tsv.open("a") as f:
                f.write(f"{name}\t{worker}\t{start:.1f}\t{sec:.1f}\n")
            state = "done" if rc == 0 else f"FAILED (exit {rc})"
            print(f"[{time.strftime('%H:%M:%S')}] worker {worker}: {state} {name} in {sec:.0f} s "
                  f"({len(done) + 1}/{len(jobs)})", flush=True)
            if rc:
                failed = failed or name
            else:
                done.add(name)
    if failed:
        log = logs / f"{failed}.log"
        tail = log.read_text().splitlines()[-TAIL_LINES:]
        print(f"demo: job {failed} failed; the end of {log}:", *tail, sep="\n", file=sys.stderr)
        return results[failed][0]
    with tsv.open("a") as f:
        f.write(f"total\t-\t0.0\t{time.time() - t_start:.1f}\n")
        if workers == 1 and len(jobs) > 1:
            projected = simulate(jobs, {n: sec for n, (_, sec) in results.items()}, 2)
            f.write(f"total, 2 workers (projected)\t-\t0.0\t{projected:.1f}\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ov3common.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", default="make", help="the make command (the Makefile passes $(MAKE))")
    ap.add_argument("--out", default="reports", help="folder of demo_timings.tsv and demo_logs/")
    ap.add_argument("--job", action="append", required=True,
                    help="'name | make arguments | jobs it waits for | estimated seconds' (last two optional)")
    ap.add_argument("--workers", type=int, default=2, help="jobs run at once (default 2)")
    ap.add_argument("--serial", action="store_true", help="= --workers 1, plus the projected time on 2 workers")
    a = ap.parse_args(argv)
    jobs = [parse_job(t) for t in a.job]
    check_graph(jobs)  # the whole graph is checked before anything runs
    workers = 1 if a.serial else a.workers
    if workers < 1:
        ap.error(f"--workers must be >= 1, got {workers}")
    return run(jobs, shlex.split(a.make), Path(a.out), workers)


if __name__ == "__main__":
    sys.exit(main())
