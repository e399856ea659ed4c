"""The reference workload (benchmarks/README.md, "What is measured") through marl-ray's own PPO path;
prints JSON.

    python benchmarks/ppo_step.py --size medium --dtype bf16 --policies 1 --runtime inprocess --json out.json

One PPO iteration: 16 prompts of 16 random token ids, exactly 32 sampled tokens each (temperature
1, top_k 0, top_p 1), reward adapter score at the last token, adaptive KL 0.2 against the
base, GAE (1, 0.95), 4 epochs over minibatches of 8. With --policies N every policy gets the
16 prompts (N x 16 samples per iteration). The workload, config and runtime come from harness.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_run_args, build_workload, emit, make_config, peak_rss_mib, rss_mib, start, workdir  # noqa: E402
from turns import Turns  # noqa: E402

CONFIG_OPTIONS = ("policies", "quant", "dtype", "runtime", "threads", "backend", "gradient_checkpointing",
                  "micro_batch_size", "rollout_logprobs")  # the options that go into harness.make_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "where the built model/adapters are cached")
    ap.add_argument("--policies", type=int, default=1)
    args = ap.parse_args(argv)
    iters = args.iters or (2 if args.size == "large" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.size == "large" else 2)

    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import marl_ray.train.loop  # noqa: F401  (imported before the baseline reading)

    baseline = rss_mib()
    work = workdir(args.workdir)
    base, rm, prompts = build_workload(work, args.size, n_prompts=16 * (iters + warmup))
    cfg = make_config(base, rm, prompts, work / "out", **{k: getattr(args, k) for k in CONFIG_OPTIONS})
    run = start(cfg, seed=0)
    learner = run.learner
    steps = []
    turns = Turns(args.turns)
    turns.ready()
    try:
        for i in range(warmup + iters):
            turns.wait()
            t = time.time()
            m = learner.run_step()[learner.policies[0]]
            turns.passed()
            steps.append({"start": t, **{k: m[k] for k in ("time/step_s", "time/rollout_s", "time/score_s",
                                                             "time/train_s")}})
    finally:
        turns.finish()
    timed = steps[warmup:]
    info = run.info()
    if run.ray:  # the host is an actor: its own figures
        host_peak, host_base = info["peak_rss_mib"], info["baseline_rss_mib"]
    else:
        host_peak, host_base = peak_rss_mib(), baseline
    run.shutdown()
    med = statistics.median([s["time/step_s"] for s in timed])
    result = {
        "impl": "marl-ray", "size": args.size, "quant": args.quant, "dtype": args.dtype, "policies": args.policies,
        "runtime": args.runtime, "backend": args.backend, "gradient_checkpointing": args.gradient_checkpointing,
        "micro_batch_size": args.micro_batch_size, "rollout_logprobs": args.rollout_logprobs,
        "torch_threads": args.threads, "params": info["base_params"],
        "step_s_median": med, "step_s_all": [s["time/step_s"] for s in timed],
        "step_start_unix": [s["start"] for s in timed],
        "gen_s_median": statistics.median([s["time/rollout_s"] for s in timed]),
        "score_s_median": statistics.median([s["time/score_s"] for s in timed]),
        "train_s_median": statistics.median([s["time/train_s"] for s in timed]),
        "samples_per_s": 16 * args.policies / med,
        "peak_rss_mib": host_peak, "baseline_rss_mib": host_base, "model_rss_mib": host_peak - host_base,
        "base_copies": info["base_copies"], "iters": iters, "warmup": warmup,
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
