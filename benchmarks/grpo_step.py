"""The GRPO reference workload (benchmarks/README.md, "The GRPO workload") through marl-ray; prints JSON.

    python benchmarks/grpo_step.py --size medium --dtype bf16 --policies 1 --json out.json

One step: 16 fresh prompts of 16 random token ids, G = 4 completions each (64 completions) of
exactly 16 sampled tokens (temperature 1, top_k 0, top_p 1, EOS never sampled), reward = the
fraction of vowels of the decoded completion (benchmarks/rewards.py), group-scaled advantages,
one pass (mu = 1) and one optimizer step over the 64: loss_type dapo, epsilon 0.2, beta 0.04 (a
reference pass with the adapters disabled), LoRA r=8 alpha=16 on q_proj, v_proj (--lora-targets:
others, e.g. all-linear), lr 1e-4, grad norm clipped at 1.0 (TRL's default). --size smollm2: the
real SmolLM2-135M-Instruct (49k vocabulary) instead of a built tiny Llama. With --policies N, N GRPO policies on the one base each get
the 16 prompts (64 N completions per step). Config: harness.make_grpo_config.

Timing split (marl-ray's Learner.run_step): gen = the rollout (decode loop, with the decode steps'
logprobs); score = the reference pass, decoding and the reward function, advantages; train = the
forward/backward and the optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (GRPO, add_run_args, build_base, emit, grpo_prompts, host_memory, make_grpo_config,  # noqa: E402
                     prepare_process, start, timed_steps, workdir)

CONFIG_OPTIONS = ("policies", "quant", "dtype", "runtime", "threads", "backend", "gradient_checkpointing",
                  "micro_batch_size", "rollout_logprobs", "beta", "loss_type", "batch_rows")  # -> harness.make_grpo_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "where the built model and prompts are cached")
    ap.add_argument("--policies", type=int, default=1, help="GRPO policies on the one base")
    ap.add_argument("--beta", type=float, default=GRPO["beta"], help="KL weight (0: no reference pass)")
    ap.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"], default=GRPO["loss_type"])
    ap.add_argument("--batch-rows", type=int, default=None,
                    help="generation.batch_rows: rows a host decodes at once (default: all of a rollout)")
    ap.add_argument("--lora-targets", default="q_proj,v_proj",
                    help="the policies' LoRA target_modules: a comma list, or all-linear (every linear layer "
                         "but the output head); default: the workload's q_proj,v_proj")
    ap.add_argument("--head-chunk", type=int, default=None,
                    help="model.head_chunk: positions per chunk of the output head (default: auto)")
    args = ap.parse_args(argv)
    iters, warmup, baseline = prepare_process(args)
    work = workdir(args.workdir)
    base = build_base(work, args.size)
    prompts = grpo_prompts(work, base, GRPO["prompts_per_step"] * (iters + warmup))
    cfg = make_grpo_config(base, prompts, work / f"out-grpo-{args.size}",
                           **{k: getattr(args, k) for k in CONFIG_OPTIONS})
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, head_chunk=args.head_chunk),
        policies=tuple(dataclasses.replace(p, lora=dataclasses.replace(p.lora, target_modules=targets))
                       for p in cfg.policies))
    run = start(cfg, seed=0)
    learner = run.learner

    import json

    file_ids = {tuple(json.loads(line)["input_ids"]) for line in prompts.read_text().splitlines() if line.strip()}
    seen = {}  # per step: prompts, tokens per completion (the workload's invariants, checked below)
    rollout = learner.rollout

    def counted_rollout():
        batch = rollout()
        lens = batch.response_mask.sum(1)
        P = batch.response_start
        fed = {tuple(batch.input_ids[i, :P][batch.attention_mask[i, :P].bool()].tolist())
               for i in range(len(batch.policies))}
        seen.update(prompt_ids=set(batch.prompt_ids), min_len=int(lens.min()), max_len=int(lens.max()),
                    rows=len(batch.policies), exact_prompts=fed <= file_ids)
        return batch

    learner.rollout = counted_rollout
    steps = timed_steps(learner, args.turns, warmup + iters, lambda mp: {
        "reward": mp.get("rewards/vowels/mean"), "len": (seen["min_len"], seen["max_len"]), "rows": seen["rows"],
        "exact_prompts": seen["exact_prompts"], "prompt_ids": seen["prompt_ids"]})
    used_prompts = [s["prompt_ids"] for s in steps]
    timed = steps[warmup:]
    info = run.info()
    if run.ray:  # what the config resolves to (the model sits in the host actor)
        gc_resolved = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto"
                                                              and args.quant != "none")
    else:
        gc_resolved = bool(run.host().model.gradient_checkpointing)
    host_peak, host_base = host_memory(run, info, baseline)
    run.shutdown()
    per_step = GRPO["prompts_per_step"] * GRPO["num_generations"] * args.policies
    fresh = all(len(p) == GRPO["prompts_per_step"] for p in used_prompts) and \
        len(set().union(*used_prompts)) == GRPO["prompts_per_step"] * len(used_prompts)
    lens = sorted({n for s in steps for n in s["len"]})
    exact = all(s["exact_prompts"] for s in steps)
    if lens != [GRPO["new_tokens"]] or any(s["rows"] != per_step for s in steps) or not fresh or not exact:
        raise SystemExit(f"workload broken: completion lengths {lens}, rows {[s['rows'] for s in steps]} "
                         f"(expected {per_step}), fresh prompts every step: {fresh}, the file's 16 prompt ids "
                         f"fed as given: {exact}")
    med = statistics.median([s["time/step_s"] for s in timed])
    result = {
        "impl": "marl-ray", "workload": "grpo", "size": args.size, "quant": args.quant, "dtype": args.dtype,
        "policies": args.policies, "runtime": args.runtime, "backend": args.backend,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_resolved": gc_resolved,
        "micro_batch_size": args.micro_batch_size, "batch_rows": args.batch_rows,
        "rollout_logprobs": args.rollout_logprobs,
        "lora_targets": list(targets), "head_chunk": args.head_chunk,
        "beta": args.beta, "loss_type": args.loss_type, "num_generations": GRPO["num_generations"],
        "completions_per_step": per_step, "completion_tokens": GRPO["new_tokens"],
        "torch_threads": args.threads, "params": info["base_params"],
        "step_s_median": med, "step_s_all": [s["time/step_s"] for s in timed],
        "step_start_unix": [s["start"] for s in timed],
        "gen_s_median": statistics.median([s["time/rollout_s"] for s in timed]),
        "score_s_median": statistics.median([s["time/score_s"] for s in timed]),
        "train_s_median": statistics.median([s["time/train_s"] for s in timed]),
        "completions_per_s": per_step / med,
        "samples_per_s": per_step / med,  # = completions_per_s (the key side_by_side and plot_results read)
        "peak_rss_mib": host_peak, "baseline_rss_mib": host_base, "model_rss_mib": host_peak - host_base,
        "base_copies": info["base_copies"], "iters": iters, "warmup": warmup,
        "reward_mean": [s["reward"] for s in steps],
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
