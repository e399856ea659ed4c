"""Does each policy of a mixed-algorithm run learn as it learns alone? Prints JSON.

A verifiable task measured outside the project: a tiny Llama trained from scratch (`marl-ray sft`) on
two-digit additions with noisy answers, then RL runs on that one base with the exact-match reward
function alone, each run a set of policies (for example GRPO beside RLOO, RLOO alone, GRPO beside
GRPO). Every saved policy adapter is then loaded with plain transformers + peft (not the project's
code) and sampled on held-out problems; the figure is its sampled exact-match accuracy.

    .venv/bin/python benchmarks/mixed_vs_solo.py --seeds 0,1 --steps 60 --out /tmp/mixed
    .venv/bin/python benchmarks/mixed_vs_solo.py --runs "g=grpo,r=rloo;r=rloo" --steps 5 --sft-steps 300  # smoke

A run is "name=algorithm,name=algorithm"; runs are separated by ";".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_base(out: Path, seed: int, sft_steps: int, noise: float) -> Path:
    from marl_ray.data import arithmetic
    from marl_ray.data.domain import write_jsonl
    from marl_ray.stages.sft import SFTConfig, run_sft

    base = out / f"sft-{seed}" / "base"
    if base.exists():
        return base
    data = write_jsonl(({"text": t} for t in arithmetic.corpus(sft_steps * 32, seed=seed, noise=noise)),
                       out / f"sft-{seed}" / "sft.jsonl")
    run_sft(SFTConfig(out_dir=str(out / f"sft-{seed}"), base="scratch", data=str(data), vocab_size=260, max_len=16,
                      steps=sft_steps, lr=1.5e-3, seed=seed, samples=0))
    return base


def rl_run(out: Path, base: Path, prompts: Path, policies: dict[str, str], seed: int, steps: int, lr: float,
           runtime: str) -> Path:
    from marl_ray.config import PPORunConfig, load_config
    from marl_ray.stages.ppo import run_ppo

    cfg = load_config(PPORunConfig, base={
        "model": {"base": str(base)},
        "rewards": [{"name": "exact", "function": "marl_ray.data.arithmetic:exact_match"}],
        "policies": [{"name": n, "reward": "exact", "algorithm": alg, "num_generations": 4, "lr": lr,
                      "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}} for n, alg in policies.items()],
        "generation": {"max_new_tokens": 4, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": steps, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2},
        "cluster": {"runtime": runtime, "num_hosts": 1, "host_num_cpus": 2, "rollout_workers": 2},
        "data": {"prompts": str(prompts), "seed": seed},
        "run": {"out_dir": str(out), "seed": seed, "progress": False, "tensorboard": False},
    })
    run_ppo(cfg)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/marl-mixed-vs-solo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", default="g=grpo,r=rloo;r=rloo;g=grpo,r=grpo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sft-steps", type=int, default=900)
    ap.add_argument("--noise", type=float, default=0.5, help="fraction of SFT answers off by one")
    ap.add_argument("--base-seed", type=int, default=None,
                    help="one SFT base (of this seed) for every RL seed; default: a base per seed")
    ap.add_argument("--eval-problems", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--runtime", default="inprocess", choices=("inprocess", "ray"))
    args = ap.parse_args(argv)
    from marl_ray import console
    from marl_ray.data import arithmetic

    console.setup(quiet=True)  # stdout carries the JSON alone
    from marl_ray.data.arithmetic import sampled_accuracy
    from marl_ray.data.domain import write_jsonl

    out = Path(args.out)
    runs = [dict(kv.split("=") for kv in r.split(",")) for r in args.runs.split(";")]
    result = {"args": vars(args), "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        base = build_base(out, seed if args.base_seed is None else args.base_seed, args.sft_steps, args.noise)
        prompts = write_jsonl(arithmetic.prompt_rows(len(arithmetic.problems("train")), seed=seed, split="train",
                                                     unique=True), out / f"prompts-{seed}.jsonl")
        rows = arithmetic.prompt_rows(args.eval_problems, seed=seed, split="eval", unique=True)
        before = sampled_accuracy(base, None, rows, args.eval_samples, seed + 101)
        got = {"base": before, "runs": []}
        for pols in runs:
            name = "+".join(f"{n}-{a}" for n, a in pols.items())
            run_dir = rl_run(out / f"rl-{seed}-{name}", base, prompts, pols, seed, args.steps, args.lr, args.runtime)
            acc = {n: sampled_accuracy(base, run_dir / "policies" / n, rows, args.eval_samples, seed + 101)
                   for n in pols}
            got["runs"].append({"policies": pols, "sampled_accuracy": acc,
                                "gain": {n: a - before for n, a in acc.items()}})
            print(json.dumps({"seed": seed, "run": name, "accuracy": acc, "base": before}), file=sys.stderr, flush=True)
        got["seconds"] = time.perf_counter() - t0
        result["seeds"][seed] = got
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
