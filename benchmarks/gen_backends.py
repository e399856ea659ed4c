"""Rollout backends side by side: the reference workload through `ppo_step.py --backend hf` and
`--backend vllm`, in alternating order (harness.ab_pairs), in one environment that has vLLM (on
CPU: .venv-vllm from scripts/setup_vllm_cpu.sh). Prints JSON: per pair the generation, step and
memory figures of each backend and their vllm / hf ratios, then the ratios' median and range.

    .venv-vllm/bin/python benchmarks/gen_backends.py --size small --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ab_pairs, emit, ratio_summary, run_script  # noqa: E402

KEYS = {k: k for k in ("gen_s_median", "step_s_median", "samples_per_s", "model_rss_mib")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="(hf, vllm) pairs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    options = ["--size", args.size, "--dtype", args.dtype, "--threads", str(args.threads),
               "--iters", str(args.iters), "--warmup", str(args.warmup)]
    options += ["--workdir", args.workdir] if args.workdir else []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = ab_pairs(lambda backend, i: run_script("ppo_step.py", [*options, "--backend", backend],
                                                       Path(tmp) / f"{backend}-{i}.json"),
                         "hf", "vllm", args.repeats, KEYS)
    result = {"size": args.size, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
              "pairs": pairs, "vllm_over_hf": ratio_summary(pairs)}
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
