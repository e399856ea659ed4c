"""The reference workload (benchmarks/README.md) through TRL 0.11.4's PPO; prints JSON.

Runs inside .venv-trl (benchmarks/setup_trl_venv.sh) and imports nothing from marl_ray (nor does
harness.py at module level): it reads the files that benchmarks/ppo_step.py built in --workdir
(base-<size>/, rm-<size>/, prompts.jsonl), so run ppo_step.py once first for the same --size and
--workdir.

    .venv-trl/bin/python benchmarks/trl_peer.py --impl trl-multi-adapter --size medium --dtype bf16

--impl trl-multi-adapter: one base: AutoModelForCausalLMWithValueHead + policy LoRA, the reward
    LoRA loaded next to it (`reward_adapter=`), PPOTrainer(ref_model=None) (reference = adapters off).
--impl three-model: policy (value-head model + LoRA), a separate reference copy of the base and a
    separate reward model (AutoModelForSequenceClassification + the reward LoRA, merged unless
    quantized); PPOTrainer(model, ref_model=ref).

One iteration: generate 16 x 32 tokens (PPOTrainer.generate), reward = score at the last token of
prompt+response, PPOTrainer.step(queries, responses, rewards). Timing split, as marl-ray's:
gen = generate; score = reward pass + TRL's time/ppo/forward_pass (policy, ref and value passes)
+ time/ppo/compute_rewards + time/ppo/compute_advantages; train = the rest of step()
(time/ppo/optimize_step, calc_stats and step's own overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, peak_rss_mib, rss_mib, workdir  # noqa: E402
from turns import Turns  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the workload is local; never ask a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMPLS = ("trl-multi-adapter", "three-model")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) so a later read covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def compat_reward_adapter(rm: Path, out: Path) -> Path:
    """A copy of the reward adapter that peft 0.13.2 can read.

    The workload's adapter is written by a newer peft, whose adapter_config.json has keys that
    LoraConfig 0.13.2 rejects ("unexpected keyword argument"); keep only the fields it knows.
    The weights (base_model.model.<...>.lora_A/B.weight, base_model.model.score.weight) are
    the same format in both versions, so they are linked unchanged.
    """
    import dataclasses

    from peft import LoraConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((rm / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kept = {k: v for k, v in cfg.items() if k in known}
    if kept.get("loftq_config") == {}:
        kept.pop("loftq_config")
    (out / "adapter_config.json").write_text(json.dumps(kept, indent=2))
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        src, dst = rm / name, out / name
        if src.exists():
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src.resolve())
    return out


def load_tokenizer(base: Path):
    """The workload's tokenizer.json (its tokenizer_config names a class transformers 4.46 lacks)."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((base / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"),
                                  model_max_length=cfg.get("model_max_length", 256), **special)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quant: str, compute_dtype):
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def cpu_bnb_shims(quant: str) -> list[str]:
    """What it takes to run TRL 0.11.4's stack (transformers 4.46.3, peft 0.13.2) with bitsandbytes
    layers on a CPU. As shipped, no bitsandbytes release gets through; each shim below answers one
    failure, and changes nothing else:

    1. transformers 4.46.3 `_validate_bnb_multi_backend_availability` drops "cpu" unless
       intel_extension_for_pytorch is present (none is built for torch 2.13), and does it with
       `frozenset.discard`: every CPU 8-bit/4-bit load fails with "AttributeError: 'frozenset'
       object has no attribute 'discard'". bitsandbytes 0.50.2 has CPU kernels of its own; the
       shim answers "IPEX present" to that one check (the name as seen by that module only).
    2. TRL's ValueHead post_init refuses a model whose hf_device_map names "cpu" ("The model is
       offloaded on CPU or disk - CPU & disk offloading is not supported"); transformers sets
       {"": "cpu"} for a quantized load on a machine without a GPU: the whole model is on the CPU,
       nothing is offloaded. The shim drops that one-entry map before the check.
    3. (8bit) peft 0.13.2 reads `MatmulLtState.memory_efficient_backward`, which bitsandbytes no
       longer has (absent in 0.45.5 and every later release, which includes all the CPU-capable
       ones): "AttributeError: 'MatmulLtState' object has no attribute 'memory_efficient_backward'". The shim gives the class the
       attribute with its old default, False.
    """
    if quant == "none":
        return []
    import transformers.integrations.bitsandbytes as tib
    from trl.models.modeling_value_head import AutoModelForCausalLMWithValueHead

    shims = []
    tib.is_ipex_available = lambda: True
    shims.append("transformers: bnb CPU gate (IPEX check) passed")

    post_init = AutoModelForCausalLMWithValueHead.post_init
    if not getattr(post_init, "_cpu_shim", False):
        def patched(self, state_dict):
            if getattr(self.pretrained_model, "hf_device_map", None) == {"": "cpu"}:
                m = self.pretrained_model  # a PeftModel forwards the attribute to the model it wraps
                inner = m.get_base_model() if hasattr(m, "get_base_model") else m
                for obj in (m, inner):
                    obj.__dict__.pop("hf_device_map", None)
            return post_init(self, state_dict)

        patched._cpu_shim = True
        AutoModelForCausalLMWithValueHead.post_init = patched
    shims.append("trl: hf_device_map {'': 'cpu'} dropped before ValueHead post_init")
    if quant == "8bit":
        from bitsandbytes.autograd._functions import MatmulLtState

        if not hasattr(MatmulLtState, "memory_efficient_backward"):
            MatmulLtState.memory_efficient_backward = False
        shims.append("bitsandbytes: MatmulLtState.memory_efficient_backward = False for peft 0.13.2")
    return shims


def set_bnb_cpu_repack(model, mode: str) -> bool:
    """bitsandbytes >= 0.48 repacks a Linear4bit's weight for its CPU kernel the first time it runs
    in eval mode without autograd, which fails for out_features not a multiple of 32 (the small
    Llama's MLP: 688). mode 'auto' turns the repack off only where some layer would fail; 'off'
    always; 'on' leaves bitsandbytes' default. Returns whether the repack stays on."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not layers or mode == "on":
        return bool(layers) and any(m.support_avx512bf16_for_cpu for m in layers)
    if mode == "off" or any(getattr(m, "out_features", 32) % 32 for m in layers):
        for m in layers:
            m.support_avx512bf16_for_cpu = False
        return False
    return any(m.support_avx512bf16_for_cpu for m in layers)


class RewardScorer:
    """Score at the last real token of each row: (B,) fp32."""

    def __init__(self, impl, policy, rm_model):
        self.impl, self.policy, self.rm = impl, policy, rm_model

    def __call__(self, input_ids, attention_mask):
        import torch

        last = attention_mask.shape[1] - 1 - attention_mask.long().flip(-1).argmax(-1)
        rows = torch.arange(input_ids.shape[0])
        with torch.no_grad():
            if self.impl == "trl-multi-adapter":
                scores = self.policy.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
            else:
                # LlamaForSequenceClassification pools at the first pad id, which a sampled token
                # can equal; take the score head at the last real token directly instead.
                inner = self.rm.get_base_model() if hasattr(self.rm, "get_base_model") else self.rm
                h = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                scores = inner.score(h)
        return scores[rows, last, 0].float()


def build(args, base: Path, rm: Path, tok):
    import torch
    from peft import LoraConfig
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kw = {"torch_dtype": torch_dtype}
    q = bnb_config(args.quant, torch_dtype)
    if q is not None:
        kw["quantization_config"] = q
        if args.cpu_bnb_shims:
            args.shims_applied = cpu_bnb_shims(args.quant)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    rm_model = ref = None
    if args.impl == "trl-multi-adapter":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora,
                                                                  reward_adapter=str(rm), **kw)
    else:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora, **kw)
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), **kw)
        ref.eval().requires_grad_(False)
        sc = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, **kw)
        sc.config.pad_token_id = tok.pad_token_id
        rm_model = PeftModel.from_pretrained(sc, str(rm), is_trainable=False)
        if args.quant == "none":
            rm_model = rm_model.merge_and_unload()  # a standalone reward model, as it would be deployed
        rm_model.eval().requires_grad_(False)
    repack = [set_bnb_cpu_repack(m, args.bnb_cpu_repack) for m in (model, ref, rm_model) if m is not None]
    config = PPOConfig(exp_name=f"trl-peer-{args.impl}", seed=args.seed, batch_size=16, mini_batch_size=8,
                       ppo_epochs=4, learning_rate=1.41e-5, init_kl_coef=0.2, adap_kl_ctrl=True, gamma=1.0,
                       lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, max_grad_norm=None,
                       log_with=None)
    trainer = PPOTrainer(config=config, model=model, ref_model=ref, tokenizer=tok)
    return model, ref, rm_model, trainer, any(repack)


def count_params(model) -> int:
    """Weights of the base transformer, without adapters and heads (4-bit weights counted as weights, not bytes)."""
    import math

    inner = model.pretrained_model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    n = 0
    for name, p in inner.named_parameters():
        if "lora_" in name or "v_head" in name:
            continue
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n += int(math.prod(shape)) if shape is not None else p.numel()
    return n


def iteration(trainer, scorer, prompts, gen_kwargs, gen_batch_size) -> dict:
    """One timed PPO iteration on 16 prompts: TRL's generate, the reward scores, PPOTrainer.step."""
    import torch

    queries = [torch.tensor(p, dtype=torch.long) for p in prompts]
    start = time.time()
    t0 = time.perf_counter()
    responses = trainer.generate(queries, return_prompt=False, batch_size=gen_batch_size, **gen_kwargs)
    t1 = time.perf_counter()
    if any(len(r) != 32 for r in responses):
        raise RuntimeError(f"response lengths {[len(r) for r in responses]}, expected 32 each")
    full = torch.stack([torch.cat([q, r]) for q, r in zip(queries, responses)])
    rewards = list(scorer(full, torch.ones_like(full)).unbind(0))
    t2 = time.perf_counter()
    stats = trainer.step(queries, list(responses), rewards)
    t3 = time.perf_counter()
    fwd = sum(float(stats.get(k, 0.0)) for k in
              ("time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages"))
    return {"start": start, "step": t3 - t0, "gen": t1 - t0, "score": (t2 - t1) + fwd, "train": (t3 - t2) - fwd,
            "reward": t2 - t1, "trl_step": t3 - t2,
            "trl": {k: float(v) for k, v in stats.items() if k.startswith("time/ppo/")},
            "kl": float(stats.get("objective/kl", float("nan"))),
            "score_mean": float(torch.stack(rewards).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=IMPLS, default="trl-multi-adapter")
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--policies", type=int, default=1,
                    help="only 1: N policies in TRL are N separate jobs (benchmarks/side_by_side.py runs them)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; large: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2; large: 1)")
    ap.add_argument("--gen-batch-size", type=int, default=16,
                    help="PPOTrainer.generate batch_size (TRL's default is 4; 16 = all prompts at once)")
    ap.add_argument("--bnb-cpu-repack", choices=["auto", "on", "off"], default="auto",
                    help="bitsandbytes' CPU 4-bit weight repack (see set_bnb_cpu_repack)")
    ap.add_argument("--no-cpu-bnb-shims", dest="cpu_bnb_shims", action="store_false",
                    help="load 8bit/4bit with TRL's stack as shipped (fails on a CPU: see cpu_bnb_shims)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where ppo_step.py cached the workload")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--turns", default=None, metavar="DIR:K:N",
                    help="take turns iteration by iteration with N-1 other processes (benchmarks/turns.py)")
    args = ap.parse_args(argv)
    args.shims_applied = []
    if args.policies != 1:
        ap.error("--policies must be 1: run N separate processes for N TRL policies (side_by_side.py does)")
    iters = args.iters or (2 if args.size == "large" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.size == "large" else 2)

    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PPOTrainer/PPOConfig deprecation notices
    warnings.filterwarnings("ignore", message="No dataset is provided")
    import peft  # noqa: F401
    import transformers
    import trl  # noqa: F401

    # The classes this run uses, imported before the baseline: trl's trainer module alone pulls
    # in ~90 MiB of libraries (datasets, ...), which are not the model's memory.
    from peft import LoraConfig, PeftModel  # noqa: F401
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast  # noqa: F401
    from transformers.utils import logging as hf_logging
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: F401

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    baseline = rss_mib()

    work = workdir(args.workdir)
    base, rm_src, prompts_file = work / f"base-{args.size}", work / f"rm-{args.size}", work / "prompts.jsonl"
    for p in (base / "config.json", rm_src / "adapter_config.json", prompts_file):
        if not p.exists():
            sys.exit(f"{p} missing: run `python benchmarks/ppo_step.py --size {args.size} --workdir {work}` first")
    rm = compat_reward_adapter(rm_src, work / "trl-compat" / f"rm-{args.size}")
    prompts = [json.loads(line)["input_ids"] for line in prompts_file.read_text().splitlines() if line.strip()]
    need = 16 * (iters + warmup)
    if len(prompts) < need:
        sys.exit(f"{prompts_file} has {len(prompts)} prompts, {need} needed: rerun ppo_step.py with as many iterations")

    torch.manual_seed(args.seed)
    tok = load_tokenizer(base)
    t_load = time.perf_counter()
    model, ref, rm_model, trainer, repack = build(args, base, rm, tok)
    load_s = time.perf_counter() - t_load
    load_rss = rss_mib()
    hwm_reset = reset_hwm()
    scorer = RewardScorer(args.impl, trainer.model if args.impl == "trl-multi-adapter" else model, rm_model)
    gen_kwargs = {"min_new_tokens": 32, "max_new_tokens": 32, "do_sample": True, "top_k": 0, "top_p": 1.0,
                  "temperature": 1.0, "pad_token_id": tok.pad_token_id}
    steps = []
    turns = Turns(args.turns)
    turns.ready()
    try:
        for i in range(warmup + iters):
            turns.wait()
            steps.append(iteration(trainer, scorer, prompts[16 * i:16 * (i + 1)], gen_kwargs, args.gen_batch_size))
            turns.passed()
    finally:
        turns.finish()
    timed = steps[warmup:]
    peak = peak_rss_mib()
    med = statistics.median([s["step"] for s in timed])
    result = {
        "impl": args.impl, "size": args.size, "quant": args.quant, "dtype": args.dtype, "policies": 1,
        "runtime": "inprocess", "torch_threads": args.threads, "params": count_params(model),
        "step_s_median": med, "step_s_all": [s["step"] for s in timed],
        "step_start_unix": [s["start"] for s in timed],
        "gen_s_median": statistics.median([s["gen"] for s in timed]),
        "score_s_median": statistics.median([s["score"] for s in timed]),
        "train_s_median": statistics.median([s["train"] for s in timed]),
        "samples_per_s": 16 / med,
        "peak_rss_mib": peak, "baseline_rss_mib": baseline, "model_rss_mib": peak - baseline,
        "base_copies": 1 if args.impl == "trl-multi-adapter" else 3,
        "iters": iters, "warmup": warmup,
        # extras (not in ppo_step.py): where the time and memory went
        "reward_s_median": statistics.median([s["reward"] for s in timed]),
        "trl_time_median": {k: statistics.median([s["trl"].get(k, 0.0) for s in timed]) for k in timed[0]["trl"]},
        "load_s": load_s, "load_rss_mib": load_rss,
        "run_hwm_mib": _status_mib("VmHWM") if hwm_reset else None,  # peak RSS after loading only
        "kl_last": timed[-1]["kl"], "score_mean_last": timed[-1]["score_mean"],
        "torch_threads_end": torch.get_num_threads(),  # in case a library changed it
        "gen_batch_size": args.gen_batch_size, "bnb_cpu_repack": repack,
        "shims": args.shims_applied,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__},
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
