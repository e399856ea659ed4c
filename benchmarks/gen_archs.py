"""Generation speed per architecture: the lean decode loop against transformers' own `generate`
(dynamic cache, static cache, static cache + torch.compile), in lockstep inside one process; prints JSON.

    .venv/bin/python benchmarks/gen_archs.py --cases llama:small,llama:medium,qwen2:medium --rounds 12

The rollout of the reference workload (../shared/BENCHMARK.md): 16 prompts of 16 random ids, exactly
32 sampled tokens each (temperature 1, top_k 0, top_p 1, EOS masked), on a base of `arch` and `size`
(marl_ray.data.tiny.build_model, seed 0) with POLICIES LoRA policies (r16/a32 on q_proj, v_proj, random
B weights), the batch's rows split between them as a model host batches them: the real per-row
multi-adapter routing (the lean loop: `lora_rows`; `generate`: peft's mixed-adapter batch through
`model.route(names)`). Contenders (`--contenders`):

    lean      LeanDecode(): the default sampler of a served base (decoding.supports)
    exact     LeanDecode(exact=True): HF's arithmetic in the lean loop (tokens equal to `generate`'s)
    hf        HFGenerate: `generate` with its default dynamic cache (what other bases get)
    static    `generate(cache_implementation="static")`
    compiled  static, and the forward compiled by `generate` (CompileConfig(mode="default"), forced on CPU)

Lockstep: every round runs each contender once, in an order rotated from round to round, so the
machine's drift falls on all alike; per round each contender's time over lean's, then the median
(min-max) over rounds. Warm-up rounds first (compiling happens there; its time is reported apart).
The machine's matmul rate at a decode step's 16 rows (benchmarks/bounds.py) is measured in the same
process, and each contender's time is also given as a fraction of the generation's matmul bound.
`--probe`: after the rounds, each contender once more at a prompt length not seen yet (20), once
under another mix of policies, and once at the seen shape (what recompiling costs a compiled forward).
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

from harness import emit, spread, workdir  # noqa: E402

PROMPTS, PROMPT_LEN, NEW, POLICIES = 16, 16, 32, 4
CONTENDERS = ("lean", "exact", "hf", "static", "compiled")


def build(work: Path, arch: str, size: str) -> Path:
    """The seeded base of `arch` and `size` with a tokenizer, saved once in `work`."""
    from transformers.utils import logging as hf_logging

    from marl_ray.data.tiny import build_tiny

    out = work / f"gen-{arch}-{size}"
    if not (out / "config.json").exists():
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        build_tiny(out, arch=arch, size=size, seed=0)
    return out


def samplers(kinds):
    """name -> Sampler for each contender."""
    from transformers import CompileConfig

    from marl_ray.model import sampling

    class HFWith(sampling.HFGenerate):
        def __init__(self, name, **extra):
            self.name, self.extra = name, extra

        def _generate(self, model, ids, mask, names, scored, kwargs):
            return model.base.generate(input_ids=ids, attention_mask=mask, **kwargs, **self.extra), None

    def compiled():
        cc = CompileConfig(mode="default", fullgraph=False, dynamic=False)
        cc._compile_all_devices = True  # generate compiles on CUDA/XPU only unless told
        return HFWith("compiled", cache_implementation="static", compile_config=cc)

    make = {"lean": lambda: sampling.LeanDecode(), "exact": lambda: sampling.LeanDecode(exact=True),
            "hf": lambda: sampling.HFGenerate(), "static": lambda: HFWith("static", cache_implementation="static"),
            "compiled": compiled}
    return {k: make[k]() for k in kinds}


def linear_params(base) -> int:
    """Weights every generated or prompt token is multiplied by: the decoder's linear layers and the LM head."""
    from torch import nn

    return sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))


def run_case(work: Path, arch: str, size: str, dtype: str, kinds, rounds: int, warmup: int, threads: int,
             probe: bool = False) -> dict:
    import torch
    from peft import LoraConfig

    from marl_ray.model import MultiAdapterModel, decoding

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bounds import matmul_rate

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = MultiAdapterModel.from_pretrained(str(build(work, arch, size)), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for i in range(POLICIES):
        model.add_policy(f"p{i}", LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                         seed=i)
        with torch.no_grad():
            for k, p in model.policy_state(f"p{i}").items():
                if ".lora_B." in k:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    names = [f"p{i * POLICIES // PROMPTS}" for i in range(PROMPTS)]  # 4 rows per policy, as a host batches them
    vocab = model.base.config.vocab_size
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, do_sample=True)
    subjects = samplers(kinds)
    served = decoding.supports(model.base)

    def prompts(seed, length=PROMPT_LEN):
        ids = torch.randint(4, vocab, (PROMPTS, length), generator=torch.Generator().manual_seed(seed))
        return ids, torch.ones_like(ids)

    def once(kind, seed, length=PROMPT_LEN, rows=names):
        ids, mask = prompts(seed, length)
        torch.manual_seed(seed)
        t = time.perf_counter()
        with torch.no_grad():
            out, _ = subjects[kind].generate(model, ids, mask, rows, **kw)
        return time.perf_counter() - t, out

    # same tokens as `generate` under the same seed? (exact must be; the others are informative)
    same = {}
    ref = once("hf", 12345)[1] if "hf" in kinds else None
    first = {}
    for k in kinds:
        if k in ("lean", "exact") and not served:
            continue
        t, out = once(k, 12345)
        first[k] = round(t, 3)
        if ref is not None:
            same[k] = bool(torch.equal(out, ref))
    live = [k for k in kinds if k in first]
    times = {k: [] for k in live}
    for r in range(warmup + rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        this = {k: once(k, 1000 + r)[0] for k in order}
        if r >= warmup:
            for k in live:
                times[k].append(this[k])
    # what a real run meets after the rounds: a prompt length not seen yet, another mix of policies
    # (a compiled forward is specialised to its shapes and its adapter routing)
    later = {}
    if probe:
        for k in live:
            later[k] = {"prompt_len_20_s": round(once(k, 7, length=20)[0], 3),
                        "other_policy_mix_s": round(once(k, 8, rows=names[::-1])[0], 3),
                        "seen_shape_again_s": round(once(k, 9)[0], 3)}
    base_kind = "lean" if "lean" in live else live[0]
    ratios = {k: spread([a / b for a, b in zip(times[k], times[base_kind])], 3) for k in live if k != base_kind}
    rate = matmul_rate(size, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], threads)
    tokens = PROMPTS * (PROMPT_LEN + NEW - 1)  # positions multiplied by the weights: the prefill, then 31 steps
    gflop = 2 * linear_params(model.base) * tokens / 1e9
    bound_s = gflop / rate["decode"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "arch": arch, "size": size, "dtype": dtype, "base": type(model.base).__name__, "lean_served": served,
        "rounds": rounds, "warmup": warmup, "first_call_s": first, "same_tokens_as_generate": same,
        "after_rounds_first_calls": later,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(PROMPTS * NEW / v, 1) for k, v in med.items()},
        f"ratio_over_{base_kind}": ratios,
        "gen_gflop": round(gflop, 2), "matmul_gflops": {k: round(v) for k, v in rate.items()},
        "bound_s": round(bound_s, 4), "fraction_of_bound": {k: round(bound_s / v, 3) for k, v in med.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="llama:small,llama:medium,qwen2:medium", help="arch:size,...")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", action="store_true",
                    help="after the rounds, time each contender once at a new prompt length and another policy mix")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import platform

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.contenders.split(",") if k.strip()]
    bad = [k for k in kinds if k not in CONTENDERS]
    if bad:
        raise SystemExit(f"unknown contenders {bad}; choose from {', '.join(CONTENDERS)}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
           "load_average_start": os.getloadavg(), "cases": []}
    work = workdir(args.workdir)
    for case in args.cases.split(","):
        arch, size = case.split(":")
        res = run_case(work, arch, size, args.dtype, kinds, args.rounds, args.warmup, args.threads, args.probe)
        print(f"{case} {args.dtype}: " + ", ".join(f"{k} {v['median']}x" for k, v in
                                                    res.get("ratio_over_lean", {}).items()), file=sys.stderr, flush=True)
        out["cases"].append(res)
        if args.json:  # the cases so far, in case a later one does not finish
            Path(args.json).write_text(json.dumps(out, indent=2))
    out["load_average_end"] = os.getloadavg()
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
