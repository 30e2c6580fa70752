"""`make demo`'s runner (ov3common.demo): phases of parallel lanes of `make` runs, timed into demo_timings.tsv."""

from __future__ import annotations

import stat
import sys

import pytest

from ov3common.demo import label, main, parse_phase


def fake_make(tmp_path, fail: str = ""):
    """A `make` that records its targets in calls.txt, sleeps 0.6 s per target and fails on target ``fail``."""
    exe = tmp_path / "fake_make.py"
    exe.write_text(f"""import sys, time
args = [a for a in sys.argv[1:] if not a.startswith("-") and "=" not in a]
with open({str(tmp_path / "calls.txt")!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
time.sleep(0.6 * len(args))
print("output of", *args)
sys.exit(3 if {fail!r} in args else 0)
""")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{sys.executable} {exe}"


def test_parse_phase_and_labels():
    lanes = parse_phase("a b X=1 ; c ; || d NPROC=1")
    assert [lane.steps for lane in lanes] == [[["a", "b", "X=1"], ["c"]], [["d", "NPROC=1"]]]
    with pytest.raises(ValueError, match="without a step"):
        parse_phase("a || ;")
    assert label(["rae-train", "NPROC=1", "RAE_CFG=configs/rae/toy_baseline.yaml"]) == "rae-train (baseline)"
    assert label(["llava-stage1", "NPROC=1"]) == "llava-stage1"


def test_lanes_run_in_parallel_and_every_step_and_phase_is_timed(tmp_path):
    out = tmp_path / "reports"
    assert main(["--make", fake_make(tmp_path), "--out", str(out), "--phase", "data",
                 "--phase", "x ; y || z X=configs/baseline.yaml", "--phase", "last"]) == 0
    rows = [line.split("\t") for line in (out / "demo_timings.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "lane", "seconds"]
    names = [r[0] for r in rows[1:]]
    assert names == ["data", "phase 1", "x", "y", "z (baseline)", "phase 2", "last", "phase 3", "total"]
    lanes = {r[0]: r[1] for r in rows[1:]}
    assert lanes["x"] == lanes["y"] == "2.1" and lanes["z (baseline)"] == "2.2"
    phase2 = float(rows[names.index("phase 2") + 1][2])
    assert 1.2 <= phase2 < 1.8  # lane 2 (0.6 s) beside lane 1 (1.2 s); one after the other it is >= 1.8 s
    assert (out / "demo_logs" / "phase2-lane1.log").read_text().count("output of") == 2  # x, y
    calls = (tmp_path / "calls.txt").read_text().split("\n")
    assert calls.index("data") == 0 and calls.index("last") == 4  # phases in order


def test_a_failed_step_stops_its_lane_and_the_chain_with_its_status(tmp_path, capsys):
    out = tmp_path / "reports"
    rc = main(["--make", fake_make(tmp_path, fail="x"), "--out", str(out),
               "--phase", "x ; never || z", "--phase", "later"])
    assert rc == 3
    calls = (tmp_path / "calls.txt").read_text().split()
    assert "never" not in calls and "later" not in calls and "z" in calls  # the other lane finished its steps
    assert "phase 1 lane 1 failed" in capsys.readouterr().err
    assert "total" not in (out / "demo_timings.tsv").read_text()


def test_serial_runs_one_lane_at_a_time_and_projects_the_parallel_time(tmp_path):
    out = tmp_path / "reports"
    assert main(["--make", fake_make(tmp_path), "--out", str(out), "--serial",
                 "--phase", "x ; y || z", "--phase", "last"]) == 0
    rows = {r.split("\t")[0]: r.split("\t") for r in (out / "demo_timings.tsv").read_text().splitlines()}
    sec = {k: float(v[2]) for k, v in rows.items() if k != "step"}
    assert sec["phase 1"] >= 1.8  # x, y and z one after the other
    assert sec["phase 1, lanes in parallel"] == pytest.approx(sec["x"] + sec["y"], abs=0.11)
    assert "phase 2, lanes in parallel" not in rows  # one lane: nothing to project
    assert sec["total, lanes in parallel"] == pytest.approx(sec["phase 1, lanes in parallel"] + sec["phase 2"],
                                                            abs=0.11)
