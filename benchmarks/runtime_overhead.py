"""What the Ray runtime costs over the in-process path on one host; prints JSON.

    python benchmarks/runtime_overhead.py --size medium --dtype fp32 --pairs 3

Runs benchmarks/ppo_step.py alternately with --runtime inprocess and --runtime ray (a local Ray
on 127.0.0.1, started and stopped by each run), `--pairs` times, each as its own process, and
reports the per-pair ratio of median step times (ray / inprocess; 1.10 = Ray costs 10%) and of
each phase, then their median and range over the pairs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_step import emit, run_ppo_step  # noqa: E402


def run(runtime: str, args, out: Path) -> dict:
    options = ["--size", args.size, "--dtype", args.dtype, "--threads", str(args.threads), "--runtime", runtime]
    return run_ppo_step(options, out, env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="medium")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    keys = {"step": "step_s_median", "gen": "gen_s_median", "score": "score_s_median", "train": "train_s_median"}
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ("inprocess", "ray") if i % 2 == 0 else ("ray", "inprocess")  # neither always goes first
            res = {rt: run(rt, args, Path(tmp) / f"{i}-{rt}.json") for rt in order}
            pairs.append({"inprocess": {k: res["inprocess"][v] for k, v in keys.items()},
                          "ray": {k: res["ray"][v] for k, v in keys.items()},
                          "ratio": {k: res["ray"][v] / res["inprocess"][v] for k, v in keys.items()}})
            print(f"pair {i + 1}/{args.pairs}: ray/inprocess step {pairs[-1]['ratio']['step']:.3f}", file=sys.stderr)
    summary = {k: {"median": round(statistics.median(p["ratio"][k] for p in pairs), 3),
                   "min": round(min(p["ratio"][k] for p in pairs), 3),
                   "max": round(max(p["ratio"][k] for p in pairs), 3)} for k in keys}
    out = {"size": args.size, "dtype": args.dtype, "threads": args.threads, "pairs": pairs,
           "ray_over_inprocess": summary}
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
