import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ov3common.dist import init_distributed, step_seed
from tests.helpers import dump_and_kill_tree, process_tree, subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_single_process_init():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_step_seed_is_pure_and_distinct():
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(4)}) == 200


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/scripts/dist_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, rr in enumerate(res):
        assert (rr["rank"], rr["world"], rr["backend"]) == (i, 2, "gloo")
        assert rr["gathered"] == [1.0, 1.0, 2.0, 2.0]
        assert rr["mean"] == 0.5
        assert rr["rank_state"] == i and rr["rank_tensor"] == [i]
    # both ranks compute sum(gathered * row_index); the backward sums the two ranks' gradients into each slice
    assert res[0]["grad"] == [0.0, 2.0] and res[1]["grad"] == [4.0, 6.0]
    assert sorted(res[0]["order"] + res[1]["order"]) == list(range(10))
    assert res[0]["seed"] != res[1]["seed"]


def test_kill_tree_kills_torchrun_style_children_in_their_own_session():
    """torchrun starts ranks with ``start_new_session``: killing torchrun's group leaves them running. The test
    harness's crash (``kill_tree``) must reach them, and a stuck process dumps its stacks on SIGUSR1 first."""
    child = ("import time, sys; from ov3common.dist import init_distributed; init_distributed('cpu'); "
             "print('ready', flush=True); time.sleep(300)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "start_new_session=True); print(p.pid, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", parent], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready" and process_tree(proc.pid) == [proc.pid, pid]
    dump_and_kill_tree(proc.pid, wait=1.0)
    _, err = proc.communicate(timeout=30)
    assert "Current thread" in err and 'File "<string>", line 1' in err, err[-2000:]  # the child's stack
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
