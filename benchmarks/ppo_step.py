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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (add_run_args, build_workload, emit, host_memory, make_config, prepare_process,  # noqa: E402
                     start, timed_steps, workdir)

CONFIG_OPTIONS = ("policies", "quant", "dtype", "runtime", "threads", "backend", "gradient_checkpointing",
                  "micro_batch_size", "rollout_logprobs")  # the options that go into harness.make_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "where the built model/adapters are cached")
    ap.add_argument("--policies", type=int, default=1)
    args = ap.parse_args(argv)
    iters, warmup, baseline = prepare_process(args)
    work = workdir(args.workdir)
    base, rm, prompts = build_workload(work, args.size, n_prompts=16 * (iters + warmup))
    cfg = make_config(base, rm, prompts, work / "out", **{k: getattr(args, k) for k in CONFIG_OPTIONS})
    run = start(cfg, seed=0)
    learner = run.learner
    steps = timed_steps(learner, args.turns, warmup + iters)
    timed = steps[warmup:]
    info = run.info()
    host_peak, host_base = host_memory(run, info, baseline)
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
