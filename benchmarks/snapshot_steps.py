"""Step time and driver memory of this code against another commit, in lockstep, on 2 hosts; prints JSON.

    python benchmarks/snapshot_steps.py --baseline a62da9a~1          # about 6 minutes on 2 cores
    python benchmarks/snapshot_steps.py --baseline COMMIT --rank 8 --steps 10 --rounds 2

Made to weigh where a step's snapshot lives: with the baseline a62da9a~1 (the last commit where the
driver pulled each policy's weights and AdamW state after every step) against this tree (each host
keeps the step's start itself). Each round starts two processes, one per code (the baseline from a
`git worktree` of COMMIT in a temp dir, this tree as it is), each with its own loopback cluster of 2
raylets (benchmarks/grad_sync.py's: 127.0.0.1, token auth, a private temp dir, stopped by pid), and
each runs the real `run_ppo` (two policies, LoRA on every linear layer at --rank, 2 hosts) for
--warmup + --steps steps. The two take turns step by step (benchmarks/turns.py): one computes while
the other waits, so step i of each lies within a step's time of the other's. A step's time is the
wall time from the end of its wait to its `on_step` (the step, its snapshot and the replica check).

Reported: per round the median step time of each, their ratio (this / baseline) and the ratio over
the pairs of steps, and each driver process's peak RSS (ru_maxrss); over the rounds the median.
The order of the two processes (who goes first) alternates from round to round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(args) -> int:
    """One side: import marl_ray from args.code, run the steps taking turns, write JSON to args.result."""
    sys.path.insert(0, str(HERE))
    import grad_sync  # noqa: E402  (its REPO path goes: the code under test comes from args.code)
    from turns import Turns  # noqa: E402

    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    sys.path.insert(0, args.code)
    import resource

    import torch

    import marl_ray
    from marl_ray import console
    from marl_ray.stages.ppo import run_ppo

    assert Path(marl_ray.__file__).resolve().is_relative_to(Path(args.code).resolve()), marl_ray.__file__
    console.setup(quiet=True)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    a = grad_sync.assets(work)  # built by the parent: both sides train the same base
    cfg = grad_sync.config(a, work / f"out-{args.side}-{args.round}", 2, args.rank, args.warmup + args.steps)
    turns = Turns(args.turns)
    times, state = [], {"t": None}

    def on_step(step, metrics):
        times.append(time.perf_counter() - state["t"])
        turns.passed()
        turns.wait()
        state["t"] = time.perf_counter()

    with grad_sync.loopback_cluster(2):
        turns.ready()
        turns.wait()
        state["t"] = time.perf_counter()
        try:
            run_ppo(cfg, keep_ray=True, on_step=on_step)
        finally:
            turns.finish()
    Path(args.result).write_text(json.dumps({
        "side": args.side, "code": args.code, "step_s": times[args.warmup:],
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="a62da9a~1", help="the commit to compare with")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (all linear layers)")
    ap.add_argument("--steps", type=int, default=8, help="steps timed per process")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first, not timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    for name in ("--side", "--code", "--turns", "--result", "--round"):
        ap.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="snapshot_steps_"))
    old = work / "baseline"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline], capture_output=True, text=True,
                            check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "marl_ray"], capture_output=True,
                                text=True).stdout.strip())
    sys.path.insert(0, str(HERE))
    import grad_sync  # noqa: E402

    grad_sync.assets(work)  # the base both sides train on, built once here
    if not old.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), commit], check=True,
                       capture_output=True)
    rounds = []
    try:
        for r in range(args.rounds):
            sides = {"this": str(REPO), "baseline": str(old)}
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            tdir = work / f"turns-{r}"
            procs = {}
            for k, side in enumerate(order):
                result = work / f"{side}-{r}.json"
                env = {**os.environ, "PYTHONPATH": sides[side]}
                procs[side] = (subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--side", side, "--code", sides[side], "--round", str(r),
                     "--turns", f"{tdir}:{k}:2", "--result", str(result), "--workdir", str(work),
                     "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                    env=env, cwd=sides[side]), result)  # its cwd too: Ray's workers look there first
            for side, (p, _) in procs.items():
                if p.wait() != 0:
                    raise SystemExit(f"the {side} process failed (exit {p.returncode})")
            got = {side: json.loads(res.read_text()) for side, (_, res) in procs.items()}
            this, base = got["this"]["step_s"], got["baseline"]["step_s"]
            rounds.append({
                "round": r, "order": order,
                "step_s_median": {"this": statistics.median(this), "baseline": statistics.median(base)},
                "ratio_this_over_baseline": statistics.median(this) / statistics.median(base),
                "ratio_by_step_pair_median": statistics.median(t / b for t, b in zip(this, base)),
                "driver_peak_rss_mib": {s: got[s]["driver_peak_rss_mib"] for s in got}})
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    print(json.dumps({
        "rounds": rounds,
        "ratio_this_over_baseline_median": statistics.median(x["ratio_this_over_baseline"] for x in rounds),
        "driver_peak_rss_mib_median": {s: statistics.median(x["driver_peak_rss_mib"][s] for x in rounds)
                                       for s in ("this", "baseline")},
        "setup": {"this": head + (" + uncommitted changes" if dirty else ""), "baseline": commit,
                  "model": "small Llama (H=256, 4 layers), fp32", "lora": f"r={args.rank}, all linear layers",
                  "hosts": "2, on a ray.cluster_utils.Cluster of 2 loopback raylets (1 CPU each) per process",
                  "ppo": "two policies, batch 6 prompts, mini_batch 3, 2 epochs, 8 new tokens; save_every 0",
                  "cpus": os.cpu_count(), "torch_threads": 1,
                  "command": "python benchmarks/snapshot_steps.py " + " ".join(argv or sys.argv[1:])}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
