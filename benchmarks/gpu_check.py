"""One PPO iteration of the reference workload shape on a GPU with a ~1B random-init Llama.

    python benchmarks/gpu_check.py --out results/ --quant none 4bit

Builds a Llama of ~0.94B parameters (H=2048, 16 layers, 32k vocab, seed 0, bf16; nothing is
downloaded), a TRL-format reward adapter (LoRA r16 on q/v + score head) and 16-token random
prompts, then runs marl-ray's in-process PPO path (the model's default sampler, one mixed-adapter
scoring pass, 4 epochs over minibatches of 8; config and runtime from harness.py) and reports
generation tokens/s, samples/s and peak GPU memory for a bf16 base and a 4-bit (nf4, bf16
compute) base.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import make_config, start  # noqa: E402


def build(work: Path, vocab: int = 32000):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_ray.data.domain import corpus, write_jsonl
    from marl_ray.data.tiny import build_llama, build_tokenizer

    base, rm = work / "base-1b", work / "rm-1b"
    if not (base / "config.json").exists():
        t = time.perf_counter()
        model = build_llama("1b", seed=0, vocab_size=vocab).to(torch.bfloat16)
        model.save_pretrained(base)
        build_tokenizer(corpus(2000), vocab_size=512).save_pretrained(base)
        print(f"built base: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
        del model
    if not (rm / "adapter_config.json").exists():
        sc = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.bfloat16,
                                                                device_map={"": 0})
        sc.config.pad_token_id = 0
        pm = get_peft_model(sc, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                           target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "score" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        pm.save_pretrained(rm)
        del sc, pm
    rng = random.Random(0)
    prompts = work / "prompts-1b.jsonl"
    write_jsonl([{"input_ids": [rng.randrange(4, vocab) for _ in range(16)]} for _ in range(16 * 8)], prompts)
    return base, rm, prompts


def run(quant: str, base, rm, prompts, work: Path, iters: int, warmup: int) -> dict:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = make_config(base, rm, prompts, work / "out", quant=quant, dtype="bf16", threads=8)
    t = time.perf_counter()
    started = start(cfg, seed=0)
    load_s = time.perf_counter() - t
    learner = started.learner
    steps = []
    for _ in range(warmup + iters):
        steps.append(learner.run_step()["p0"])
    timed = steps[warmup:]
    info = started.info()
    med = lambda k: statistics.median(s[k] for s in timed)  # noqa: E731
    out = {
        "quant": quant, "dtype": "bf16", "params": info["base_params"], "device": info["device"],
        "gpu": torch.cuda.get_device_name(0), "load_s": load_s,
        "step_s_median": med("time/step_s"), "gen_s_median": med("time/rollout_s"),
        "score_s_median": med("time/score_s"), "train_s_median": med("time/train_s"),
        "gen_tokens_per_s": 16 * 32 / med("time/rollout_s"), "samples_per_s": 16 / med("time/step_s"),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20, "iters": iters, "warmup": warmup,
        "kl_last": timed[-1]["objective/kl"], "score_last": timed[-1]["objective/scores"],
    }
    started.shutdown()
    del learner, started
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_results")
    ap.add_argument("--work", default="/tmp/marl-ray-gpu")
    ap.add_argument("--quant", nargs="+", default=["none", "4bit"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(8)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base, rm, prompts = build(work)
    results = []
    for q in args.quant:
        try:
            r = run(q, base, rm, prompts, work, args.iters, args.warmup)
        except Exception as e:
            r = {"quant": q, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps(r, indent=2), flush=True)
        results.append(r)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
