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


def run_with_kills(cmd: list[str], metrics: Path, kills: int = 2, min_step: int = 1, max_step: int = 20,
                   seed: int = 0, env: dict | None = None, timeout: float = 300) -> list[int]:
    """Run ``cmd`` and SIGKILL it ``kills`` times, each once ``metrics`` (a metrics.jsonl) shows a random step in
    [min_step, max_step] beyond the previous kill; rerun until it exits 0. Returns the steps it was killed after.
    The command must resume from its own checkpoints."""
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
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{cmd} did not finish in {timeout}s")
            if target is not None and last_step(metrics) >= target:
                os.killpg(proc.pid, signal.SIGKILL)
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
