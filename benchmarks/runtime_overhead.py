"""What the Ray runtime costs over the in-process path on one host; prints JSON.

    python benchmarks/runtime_overhead.py --size medium --dtype fp32 --pairs 3

Runs benchmarks/ppo_step.py with --runtime inprocess and --runtime ray (a local Ray on
127.0.0.1, started and stopped by each run), `--pairs` times, each as its own process, in
alternating order (harness.ab_pairs), and reports the per-pair ratio of median step times
(ray / inprocess; 1.10 = Ray costs 10%) and of each phase, then their median and range over the pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ab_pairs, emit, ratio_summary, run_script  # noqa: E402

KEYS = {"step": "step_s_median", "gen": "gen_s_median", "score": "score_s_median", "train": "train_s_median"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="medium")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="passed on to ppo_step.py (default there: 5, large 2)")
    ap.add_argument("--warmup", type=int, default=None, help="passed on (default there: 2, large 1)")
    ap.add_argument("--workdir", default=None, help="passed on: where the workload is cached")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    options = ["--size", args.size, "--dtype", args.dtype, "--threads", str(args.threads)]
    for name in ("iters", "warmup", "workdir"):
        if getattr(args, name) is not None:
            options += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = ab_pairs(lambda rt, i: run_script("ppo_step.py", [*options, "--runtime", rt],
                                                  Path(tmp) / f"{i}-{rt}.json", env=env),
                         "inprocess", "ray", args.pairs, KEYS)
    out = {"size": args.size, "dtype": args.dtype, "threads": args.threads, "pairs": pairs,
           "ray_over_inprocess": ratio_summary(pairs)}
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
