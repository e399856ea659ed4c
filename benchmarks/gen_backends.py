"""Rollout backends side by side: the reference workload through `ppo_step.py --backend hf` and
`--backend vllm`, alternating, in one environment that has vLLM (on CPU: .venv-vllm from
scripts/setup_vllm_cpu.sh). Prints JSON: per repeat the generation, step and memory figures of
each backend, and the vllm / hf ratios (median and spread over the repeats).

    .venv-vllm/bin/python benchmarks/gen_backends.py --size small --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(backend: str, args, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "ppo_step.py"), "--size", args.size, "--dtype", args.dtype,
           "--backend", backend, "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--json", str(out)]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


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
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
