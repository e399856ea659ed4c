"""A/B of one model setting inside one process, phase by phase; prints JSON.

    python benchmarks/phase_ab.py --size medium --dtype bf16 --attr passes --a hf --b auto

Separate processes on a shared machine drift by 10-20% from one minute to the next, more than
most single changes gain. This runs both variants in the same process on the same rollouts:
each round times one rollout under A and one under B (generation: different prompts, the same
work), then, on the last of them, the scoring pass (evaluate + advantages) and the training
phase (4 epochs) under A and under B, in alternating order, restoring the policy's weights and
optimizer state before each. `--attr` is a setting of the host's MultiAdapterModel, --a/--b its
two values:

    sampler                 auto | lean | exact | hf   (marl_ray.model.sampling.make; rollouts)
    passes                  auto | hf                  (scoring and training passes)
    gradient_checkpointing  true | false               (training)

Any other attribute of the model is set as given (true/false/none, or the string).
Reports per-phase medians and the median of the per-round ratios B / A (< 1: B is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import build_workload, emit, make_config, start, workdir  # noqa: E402

CHOICES = {"sampler": ("auto", "lean", "exact", "hf"), "passes": ("auto", "hf"),
           "gradient_checkpointing": ("true", "false")}


def _plain(text: str):
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def setter(host, attr: str, text: str):
    """A function that puts the host's model into variant `text` of `attr`."""
    from marl_ray.model import sampling

    model = host.model
    if attr in CHOICES and text.lower() not in CHOICES[attr]:
        raise SystemExit(f"--attr {attr}: {text!r} is not one of {', '.join(CHOICES[attr])}")
    if attr == "sampler":
        if host.sampler is not model.sampler:
            raise SystemExit("the host samples with its own engine (vLLM), not the model's sampler")
        sampler = sampling.make(text.lower(), model.base)

        def put():  # the host keeps its own reference to the model's sampler: set both
            model.sampler = host.sampler = sampler
        return put
    if not hasattr(model, attr):
        raise SystemExit(f"the model has no attribute {attr!r}")
    value = _plain(text.lower() if attr in CHOICES else text)
    return lambda: setattr(model, attr, value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--attr", required=True, help="the MultiAdapterModel setting to switch (see above)")
    ap.add_argument("--a", required=True, help="its value for variant A")
    ap.add_argument("--b", required=True, help="its value for variant B")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = workdir(args.workdir)
    base, rm, prompts = build_workload(work, args.size, n_prompts=16 * (2 * args.rounds + 2))
    cfg = make_config(base, rm, prompts, work / "out", dtype=args.dtype, threads=args.threads)
    run = start(cfg, seed=0)
    learner, host = run.learner, run.host()
    variants = {"A": setter(host, args.attr, args.a), "B": setter(host, args.attr, args.b)}
    learner.run_step()  # warm-up
    policy = learner.policies[0]
    times = {v: {"gen": [], "score": [], "train": []} for v in variants}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for v in order:
            variants[v]()
            t0 = time.perf_counter()
            batch = learner.rollout()
            times[v]["gen"].append(time.perf_counter() - t0)
        # in-process, the optimizer state in get_state is the live one: copy it before it changes
        state = copy.deepcopy(host.get_state(policy))
        for v in order:
            variants[v]()
            host.set_state(policy, copy.deepcopy(state))
            t0 = time.perf_counter()
            ev = learner.evaluate(batch)
            adv = learner.advantages(batch, ev)
            t1 = time.perf_counter()
            learner.train(batch, ev, adv)
            t2 = time.perf_counter()
            times[v]["score"].append(t1 - t0)
            times[v]["train"].append(t2 - t1)
        learner.step += 1
    out = {"size": args.size, "dtype": args.dtype, "attr": args.attr, "A": args.a, "B": args.b,
           "rounds": args.rounds, "threads": args.threads,
           "median_s": {v: {k: round(statistics.median(x), 4) for k, x in t.items()} for v, t in times.items()},
           "ratio_b_over_a": {k: round(statistics.median(b / a for a, b in zip(times["A"][k], times["B"][k])), 3)
                              for k in ("gen", "score", "train")}}
    run.shutdown()
    return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
