import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ov3common.dist import init_distributed, step_seed

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
