"""benchmarks/turns.py: processes of a side-by-side round take turns iteration by iteration."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# Process K runs `iters` iterations; each appends "K i" to one shared log, sleeping between the
# write and passing the turn, so two processes running at once would interleave wrongly.
WORKER = """
import sys, time
sys.path.insert(0, {bench!r})
from turns import Turns
spec, iters, log, fail_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
k = int(spec.split(":")[-2])
t = Turns(spec)
time.sleep(0.05 * k)  # loads of different lengths
t.ready()
try:
    for i in range(iters):
        t.wait()
        if i == fail_at:
            raise SystemExit(3)
        with open(log, "a") as f:
            f.write(f"{{k}} {{i}}\\n")
        time.sleep(0.02)
        t.passed()
finally:
    t.finish()
    with open(log, "a") as f:
        f.write(f"{{k}} exit\\n")
"""


def _run(tmp_path, iters, fail_at=(-1, -1, -1)):
    log = tmp_path / "log"
    code = WORKER.format(bench=str(BENCH))
    n = len(iters)
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{tmp_path / 'turns'}:{k}:{n}", str(iters[k]), str(log),
                               str(fail_at[k])]) for k in range(n)]
    rcs = [p.wait(timeout=60) for p in procs]
    return rcs, log.read_text().split("\n")[:-1]


def test_processes_alternate_iteration_by_iteration(tmp_path):
    rcs, lines = _run(tmp_path, [3, 3])
    assert rcs == [0, 0]
    assert lines[:6] == ["0 0", "1 0", "0 1", "1 1", "0 2", "1 2"]
    assert sorted(lines[6:]) == ["0 exit", "1 exit"]  # nobody exits before every iteration ran


def test_turns_of_a_finished_or_failed_process_are_skipped(tmp_path):
    rcs, lines = _run(tmp_path, [1, 4, 3], fail_at=(-1, -1, 1))
    assert rcs == [0, 0, 3]
    assert lines[:6] == ["0 0", "1 0", "2 0", "1 1", "1 2", "1 3"]
    assert sorted(lines[6:]) == ["0 exit", "1 exit", "2 exit"]
