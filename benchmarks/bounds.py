"""The reference workload's FLOP bound on this machine, and each phase's time as a fraction of it; prints JSON.

    python benchmarks/bounds.py                                   # bounds only
    python benchmarks/bounds.py --results benchmarks/results/STAMP.json   # + fractions of runs

One PPO iteration of ../shared/BENCHMARK.md multiplies by the base's weights on a known number of
token positions: generation (16 prompts of 16 tokens, then 31 decode steps), the scoring passes
(policy, reference and reward rows: 48 rows of 48 tokens) and training (4 epochs over 16 rows:
a forward and the input gradients; frozen weights get no weight gradients). This counts those
FLOPs as BENCHMARK.md's issue does (decoder linear layers + LM head; attention and LoRA are a few
percent and left out), measures this machine's matrix-product rate at the workload's shapes with
the same thread count, and divides: `bound_s` is the time those products alone would take at the
best measured rate, with everything else free. With --results (a side_by_side.py JSON) each run's
phase times become fractions: bound_s / measured_s (1.0 = at the bound).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit  # noqa: E402

SIZES = {"small": (256, 4), "medium": (512, 8), "large": (1024, 16)}  # hidden size, layers
VOCAB, PROMPTS, PROMPT_LEN, NEW, MINIBATCH, EPOCHS = 512, 16, 16, 32, 8, 4


def dims(size: str) -> tuple[int, int, int]:
    H, L = SIZES[size]
    return H, L, math.ceil(H * 2.6875 / 8) * 8


def gflop(size: str) -> dict[str, float]:
    """Matrix-product GFLOP of one iteration, per phase."""
    H, L, I = dims(size)
    per_token = 2 * L * (4 * H * H + 3 * H * I)  # q, k, v, o + gate, up, down
    head = 2 * H * VOCAB
    T = PROMPT_LEN + NEW
    gen_tokens = PROMPTS * (PROMPT_LEN + NEW - 1)  # prefill + 31 decode steps
    gen = gen_tokens * per_token + PROMPTS * NEW * head
    score = 3 * PROMPTS * T * per_token + 2 * PROMPTS * NEW * head  # policy, reference, reward rows
    train = EPOCHS * PROMPTS * (T * per_token + NEW * head) * 2  # forward + input gradients
    out = {"gen": gen / 1e9, "score": score / 1e9, "train": train / 1e9}
    out["total"] = sum(out.values())
    return out


def matmul_rate(size: str, dtype, threads: int, reps: int = 20) -> dict[str, float]:
    """GFLOP/s of x @ W.T at the shapes of training/scoring (many rows) and decoding (16 rows)."""
    import torch

    torch.set_num_threads(threads)
    H, L, I = dims(size)
    rates = {}
    for name, rows in (("train", MINIBATCH * (PROMPT_LEN + NEW)), ("score", 3 * PROMPTS * (PROMPT_LEN + NEW)),
                       ("decode", PROMPTS)):
        best = 0.0
        for n_out, n_in in ((I, H), (H, I), (H, H)):
            x = torch.randn(rows, n_in, dtype=dtype)
            w = torch.randn(n_out, n_in, dtype=dtype)
            for _ in range(3):
                x @ w.T
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                x @ w.T
                times.append(time.perf_counter() - t)
            best = max(best, 2 * rows * n_in * n_out / statistics.median(times) / 1e9)
        rates[name] = best
    return rates


def _median(runs, key):
    vals = [r[key] for r in runs if r and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="a side_by_side.py JSON: add each run's fractions of the bound")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import platform

    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    out = {"cpu": cpu, "threads": args.threads, "torch": torch.__version__, "bounds": {}, "runs": []}
    for size in args.sizes.split(","):
        for dt in args.dtypes.split(","):
            rate = matmul_rate(size, dtypes[dt], args.threads)
            peak = max(rate.values())
            work = gflop(size)
            out["bounds"][f"{size}-{dt}"] = {
                "gflop": {k: round(v, 1) for k, v in work.items()},
                "matmul_gflops": {k: round(v) for k, v in rate.items()},
                "bound_s": {k: round(v / peak, 3) for k, v in work.items()},
            }
    if args.results:
        data = json.loads(Path(args.results).read_text())
        for cfg in data["configs"]:
            key = f"{cfg['size']}-{cfg['dtype']}"
            if key not in out["bounds"] or cfg.get("quant", "none") != "none":
                continue
            bound = out["bounds"][key]["bound_s"]
            for impl, runs in cfg["runs"].items():
                phases = {"gen": _median(runs, "gen_s_median"), "score": _median(runs, "score_s_median"),
                          "train": _median(runs, "train_s_median"), "total": _median(runs, "step_s_median")}
                if phases["total"] is None:
                    continue
                per_policy = cfg.get("policies", 1) if impl == "marl-ray" else 1  # N policies: N x the work
                out["runs"].append({
                    "size": cfg["size"], "dtype": cfg["dtype"], "policies": cfg.get("policies", 1), "impl": impl,
                    "measured_s": {k: round(v, 3) for k, v in phases.items() if v is not None},
                    "fraction_of_bound": {k: round(bound[k] * per_policy / v, 2) for k, v in phases.items()
                                          if v is not None},
                })
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
