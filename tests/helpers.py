"""Shared test utilities (imported as ``tests.helpers``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict:
    """Environment for subprocess runs of our modules: this checkout first on the path, one thread, no bars."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OV3_NO_PROGRESS": "1", **extra}


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return -1
    step = -1
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", -1)))
        except (json.JSONDecodeError, ValueError, TypeError):
            continue
    return step


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``), parents first. torchrun starts each rank in a session of
    its own, so killing torchrun's process group leaves the ranks running: a crash is simulated by killing the tree."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant at once (a node failure: no process outlives it to write anything)."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGSTOP)  # freeze first: nothing forks or writes while the tree is collected
        except ProcessLookupError:
            pass
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def dump_and_kill_tree(pid: int, wait: float = 3.0) -> None:
    """A stuck run: SIGUSR1 to every process below ``pid`` (ranks that called ``init_distributed`` print their
    threads' stacks to stderr), then :func:`kill_tree`."""
    for p in process_tree(pid)[1:]:
        try:
            os.kill(p, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(wait)
    kill_tree(pid)


def run_tree(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that, past ``timeout``, dumps the stacks of the run's
    processes and kills all of them (torchrun's ranks included), then fails the test with the stderr tail."""
    proc = subprocess.Popen(cmd, env=env or subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_and_kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)[:300]}\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_with_kills(cmd: list[str], metrics: Path, kills: int = 2, min_step: int = 1, max_step: int = 20,
                   seed: int = 0, env: dict | None = None, timeout: float = 300) -> list[int]:
    """Run ``cmd`` and SIGKILL it ``kills`` times, each once ``metrics`` (a metrics.jsonl) shows a random step in
    [min_step, max_step] beyond the previous kill; rerun until it exits 0. Returns the steps it was killed after.
    Every process of the run dies at each kill (:func:`kill_tree`: torchrun's ranks included). The command must
    resume from its own checkpoints."""
    rng = random.Random(seed)
    killed_at: list[int] = []
    deadline = time.time() + timeout
    while True:
        start = last_step(metrics)
        target = start + rng.randint(min_step, max_step) if len(killed_at) < kills else None
        proc = subprocess.Popen(cmd, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            if time.time() > deadline:
                dump_and_kill_tree(proc.pid)
                out = proc.stdout.read().decode(errors="replace")
                raise TimeoutError(f"{cmd} did not finish in {timeout}s:\n{out[-8000:]}")
            if target is not None and last_step(metrics) >= target:
                kill_tree(proc.pid)
                proc.wait()
                killed_at.append(last_step(metrics))
                break
            time.sleep(0.05)
        else:
            out = proc.stdout.read().decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd} exited {proc.returncode}:\n{out[-4000:]}")
            return killed_at


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
