"""`make demo`'s runner (ov3common.demo): a graph of `make` runs on a few workers, timed into demo_timings.tsv."""

from __future__ import annotations

import stat
import sys

import pytest

from ov3common.demo import Job, check_graph, critical_path, main, parse_job, simulate


def fake_make(tmp_path, fail: str = ""):
    """A `make` that records its targets in calls.txt (start and end), sleeps 0.5 s per target and fails on target
    ``fail``."""
    exe = tmp_path / "fake_make.py"
    exe.write_text(f"""import sys, time
args = [a for a in sys.argv[1:] if not a.startswith("-") and "=" not in a]
with open({str(tmp_path / "calls.txt")!r}, "a") as f:
    f.write("start " + " ".join(args) + "\\n")
time.sleep(0.5 * len(args))
print("output of", *args)
with open({str(tmp_path / "calls.txt")!r}, "a") as f:
    f.write("end " + " ".join(args) + "\\n")
sys.exit(3 if {fail!r} in args else 0)
""")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{sys.executable} {exe}"


def timings(out) -> dict[str, list[str]]:
    rows = [line.split("\t") for line in (out / "demo_timings.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "worker", "start_s", "seconds"]
    return {r[0]: r[1:] for r in rows[1:]}


def test_parse_job_and_graph_errors():
    j = parse_job("rae-train-baseline | rae-train NPROC=1 RAE_CFG=configs/rae/toy_baseline.yaml | cache | 440")
    assert (j.name, j.args, j.after, j.estimate) == (
        "rae-train-baseline", ["rae-train", "NPROC=1", "RAE_CFG=configs/rae/toy_baseline.yaml"], ["cache"], 440.0)
    assert parse_job("data | data") == Job("data", ["data"], [], 1.0)
    with pytest.raises(ValueError, match="a job is"):
        parse_job("only-a-name")
    with pytest.raises(ValueError, match="estimated seconds must be a number"):
        parse_job("a | a | | soon")
    with pytest.raises(ValueError, match="letters, digits"):
        parse_job("a/b | a")
    with pytest.raises(ValueError, match="waits for 'nope', which is not a job"):
        check_graph([Job("a", ["a"], ["nope"])])
    with pytest.raises(ValueError, match="given twice"):
        check_graph([Job("a", ["a"]), Job("a", ["b"])])
    with pytest.raises(ValueError, match="cycle"):
        check_graph([Job("a", ["a"], ["b"]), Job("b", ["b"], ["a"])])
    with pytest.raises(ValueError, match="cycle"):  # checked before anything runs
        main(["--job", "a | a | b", "--job", "b | b | a"])


def test_critical_path_orders_the_queue_and_simulate_replays_it():
    jobs = [Job("data", ["data"], [], 1), Job("short", ["s"], ["data"], 2), Job("long", ["l"], ["data"], 5),
            Job("after_long", ["al"], ["long"], 4), Job("end", ["e"], ["short", "after_long"], 1)]
    assert critical_path(jobs) == {"data": 11, "short": 3, "long": 10, "after_long": 5, "end": 1}
    sec = {j.name: j.estimate for j in jobs}
    assert simulate(jobs, sec, 1) == sum(sec.values())
    assert simulate(jobs, sec, 2) == 11  # long -> after_long on one worker, short beside them, end last
    # taking the short job first would not change this graph's end; a graph where the order matters:
    jobs = [Job("a", ["a"], [], 1), Job("b", ["b"], [], 1), Job("c", ["c"], [], 4), Job("d", ["d"], ["c"], 4)]
    assert simulate(jobs, {j.name: j.estimate for j in jobs}, 2) == 8  # c first (path 8), a and b beside it


def test_workers_run_ready_jobs_in_parallel_and_wait_for_dependencies(tmp_path):
    out = tmp_path / "reports"
    assert main(["--make", fake_make(tmp_path), "--out", str(out), "--workers", "2",
                 "--job", "data | data",
                 "--job", "x | x | data | 2", "--job", "y | y | x", "--job", "z | z X=configs/baseline.yaml | data",
                 "--job", "last | last | y z"]) == 0
    t = timings(out)
    assert list(t) == ["data", "x", "z", "y", "last", "total"] or list(t) == ["data", "z", "x", "y", "last", "total"]
    start = {k: float(v[1]) for k, v in t.items()}
    sec = {k: float(v[2]) for k, v in t.items()}
    assert abs(start["x"] - start["z"]) < 0.3  # both ready after data: they ran side by side
    assert start["y"] >= start["x"] + sec["x"] - 0.1  # y waited for x
    assert start["last"] >= max(start["y"] + sec["y"], start["z"] + sec["z"]) - 0.1
    assert 2.0 <= sec["total"] < 2.9  # data, x | z, y, last: 4 x 0.5 s plus overhead; one worker would take 2.5 s
    assert (out / "demo_logs" / "z.log").read_text().count("output of z") == 1
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0] == "start data" and calls[-1] == "end last"


def test_a_failed_job_stops_the_chain_with_its_status(tmp_path, capsys):
    out = tmp_path / "reports"
    rc = main(["--make", fake_make(tmp_path, fail="x"), "--out", str(out),
               "--job", "x | x", "--job", "z | z z2", "--job", "never | never | x", "--job", "later | later | z"])
    assert rc == 3
    calls = (tmp_path / "calls.txt").read_text().split("\n")
    assert "end z z2" in calls  # the job running when x failed (1 s against x's 0.5 s) finished
    assert "start never" not in calls and "start later" not in calls  # nothing starts after a failure
    assert "job x failed" in capsys.readouterr().err
    assert "total" not in (out / "demo_timings.tsv").read_text()


def test_serial_runs_one_job_at_a_time_and_projects_two_workers(tmp_path):
    out = tmp_path / "reports"
    assert main(["--make", fake_make(tmp_path), "--out", str(out), "--serial",
                 "--job", "x | x", "--job", "y | y | x", "--job", "z | z", "--job", "last | last | y z"]) == 0
    t = timings(out)
    sec = {k: float(v[2]) for k, v in t.items()}
    assert {v[0] for k, v in t.items() if "total" not in k} == {"1"}
    assert sec["total"] >= 2.0  # x, y, z, last one after the other
    assert sec["total, 2 workers (projected)"] == pytest.approx(sec["x"] + sec["y"] + sec["last"], abs=0.2)
