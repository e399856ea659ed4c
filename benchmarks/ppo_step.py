"""The reference workload (../shared/BENCHMARK.md) through marl-ray's own PPO path; prints JSON.

    python benchmarks/ppo_step.py --size medium --dtype bf16 --policies 1 --runtime inprocess --json out.json

One PPO iteration: 16 prompts of 16 random token ids, exactly 32 sampled tokens each (temperature
1, top_k 0, top_p 1), reward adapter score at the last token, adaptive KL 0.2 against the
base, GAE (1, 0.95), 4 epochs over minibatches of 8. With --policies N every policy gets the
16 prompts (N x 16 samples per iteration).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turns import Turns  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def emit(result: dict, path: str | None) -> int:
    """Print a benchmark's result as JSON, also to `path` when given; 0, the exit status."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0


def run_ppo_step(options: list[str], out: Path, env: dict | None = None) -> dict:
    """This script with `options`, in a process of its own on this interpreter; its JSON result."""
    here = Path(__file__).resolve().parent
    cmd = [sys.executable, str(here / "ppo_step.py"), *options, "--json", str(out)]
    done = subprocess.run(cmd, cwd=here.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def build_workload(work: Path, size: str, n_prompts: int, seed: int = 0):
    """Base (seed 0), tokenizer, a TRL-format reward adapter (r16/a32 q,v + score head), prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from marl_ray.data.domain import corpus, write_jsonl
    from marl_ray.data.tiny import build_llama, build_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = work / f"base-{size}"
    if not (base / "config.json").exists():
        tok = build_tokenizer(corpus(3000, seed=0), vocab_size=512)
        build_llama(size, seed=0, vocab_size=512).save_pretrained(base)
        tok.save_pretrained(base)
    rm = work / f"rm-{size}"
    if not (rm / "adapter_config.json").exists():
        sc = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        sc.config.pad_token_id = 0
        peft_rm = get_peft_model(sc, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in peft_rm.named_parameters():
                if "lora_B" in n or "score" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_rm.save_pretrained(rm)
        del sc, peft_rm
    rng = random.Random(seed)
    prompts = work / "prompts.jsonl"
    write_jsonl([{"input_ids": [rng.randrange(4, 512) for _ in range(16)]} for _ in range(n_prompts)], prompts)
    return base, rm, prompts


def make_config(base, rm, prompts, args, out_dir):
    from marl_ray.config import PPORunConfig, load_config

    policies = [{"name": f"p{i}", "reward": "rm", "lr": 1.41e-5, "init_kl_coef": 0.2, "adaptive_kl": True,
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
                for i in range(args.policies)]
    return load_config(PPORunConfig, base={
        "model": {"base": str(base), "quantization": args.quant, "dtype": args.dtype,
                  "gradient_checkpointing": {"auto": None, "on": True, "off": False}[getattr(args, "gradient_checkpointing", "auto")]},
        "rewards": [{"name": "rm", "path": str(rm)}],
        "policies": policies,
        "generation": {"max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "backend": getattr(args, "backend", "hf")},
        "ppo": {"steps": 1000, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "gamma": 1.0, "lam": 0.95,
                "micro_batch_size": getattr(args, "micro_batch_size", None),
                "rollout_logprobs": {"auto": None, "on": True, "off": False}[getattr(args, "rollout_logprobs", "auto")],
                "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "max_grad_norm": None},
        "cluster": {"runtime": args.runtime, "num_hosts": 1, "host_num_cpus": args.threads, "rollout_workers": 1},
        "data": {"prompts": str(prompts), "max_prompt_tokens": 16},
        "run": {"out_dir": str(out_dir), "tensorboard": False, "progress": False, "seed": 0},
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--policies", type=int, default=1)
    ap.add_argument("--runtime", choices=["inprocess", "ray"], default="inprocess")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                    help="rollout engine (vllm: needs the vllm extra, e.g. .venv-vllm on CPU)")
    ap.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                    help="recompute decoder layers in training (auto: on for 4/8-bit bases)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="ppo.micro_batch_size: rows per training pass (default: the whole minibatch)")
    ap.add_argument("--rollout-logprobs", choices=["auto", "on", "off"], default="auto",
                    help="ppo.rollout_logprobs: old logprobs/values from the decode steps (auto: on unless 4/8-bit)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the model host")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; large: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2; large: 1)")
    ap.add_argument("--workdir", default=None, help="where the built model/adapters are cached")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--turns", default=None, metavar="DIR:K:N",
                    help="take turns iteration by iteration with N-1 other processes (benchmarks/turns.py)")
    args = ap.parse_args(argv)
    iters = args.iters or (2 if args.size == "large" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.size == "large" else 2)

    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from marl_ray.actors.handles import get
    from marl_ray.learner import Learner

    baseline = rss_mib()
    work = Path(args.workdir or os.path.join(tempfile.gettempdir(), "marl-ray-bench"))
    work.mkdir(parents=True, exist_ok=True)
    base, rm, prompts = build_workload(work, args.size, n_prompts=16 * (iters + warmup))
    cfg = make_config(base, rm, prompts, args, work / "out")
    if args.runtime == "ray":
        from marl_ray.cluster import init_ray, shutdown_actors, start_actors

        init_ray(None, num_cpus=max(2, args.threads))
        hosts, workers, worker_host, placement = start_actors(cfg, seed=0)
    else:
        from marl_ray.cluster import start_inprocess

        hosts, workers, worker_host = start_inprocess(cfg, seed=0)
    info = get(hosts[0].info.remote())
    learner = Learner(cfg, hosts, workers, worker_host)
    steps = []
    turns = Turns(args.turns)
    turns.ready()
    try:
        for i in range(warmup + iters):
            turns.wait()
            start = time.time()
            m = learner.run_step()[learner.policies[0]]
            turns.passed()
            steps.append({"start": start, **{k: m[k] for k in ("time/step_s", "time/rollout_s", "time/score_s",
                                                                 "time/train_s")}})
    finally:
        turns.finish()
    timed = steps[warmup:]
    info = get(hosts[0].info.remote())
    if args.runtime == "ray":
        host_peak, host_base = info["peak_rss_mib"], info["baseline_rss_mib"]
        shutdown_actors(workers + hosts, placement.pg)
        import ray

        ray.shutdown()
    else:
        import resource

        host_peak, host_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, baseline
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
