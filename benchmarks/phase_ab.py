"""A/B of one model setting inside one process, phase by phase; prints JSON.

    python benchmarks/phase_ab.py --size medium --dtype bf16 --attr lean_passes --a false --b true

Separate processes on a shared machine drift by 10-20% from one minute to the next, more than
most single changes gain. This runs both variants in the same process on the same rollouts:
each round times one rollout under A and one under B (generation: different prompts, the same
work), then, on the last of them, the scoring pass (evaluate + advantages) and the training
phase (4 epochs) under A and under B, in alternating order, restoring the policy's weights and
optimizer state before each. `--attr` is an attribute of the host's MultiAdapterModel (e.g.
`lean_passes`, `exact_generate`, `gradient_checkpointing`); --a/--b are its two values.
Reports per-phase medians and the median of the per-round ratios B / A (< 1: B is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo_step  # noqa: E402  (the workload and config of benchmarks/ppo_step.py)


def _value(text: str):
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "medium", "large"], default="small")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--attr", required=True, help="MultiAdapterModel attribute to switch")
    ap.add_argument("--a", required=True, help="its value for variant A (true/false/none or a string)")
    ap.add_argument("--b", required=True, help="its value for variant B")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import os
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from marl_ray.cluster import start_inprocess
    from marl_ray.learner import Learner

    work = Path(args.workdir or os.path.join(tempfile.gettempdir(), "marl-ray-bench"))
    work.mkdir(parents=True, exist_ok=True)
    base, rm, prompts = ppo_step.build_workload(work, args.size, n_prompts=16 * (2 * args.rounds + 2))
    run_args = argparse.Namespace(size=args.size, quant="none", dtype=args.dtype, policies=1, runtime="inprocess",
                                  threads=args.threads)
    cfg = ppo_step.make_config(base, rm, prompts, run_args, work / "out")
    hosts, workers, worker_host = start_inprocess(cfg, seed=0)
    host = hosts[0]._obj
    model = host.model
    if not hasattr(model, args.attr):
        raise SystemExit(f"the model has no attribute {args.attr!r}")
    values = {"A": _value(args.a), "B": _value(args.b)}
    learner = Learner(cfg, hosts, workers, worker_host)
    learner.run_step()  # warm-up
    policy = learner.policies[0]
    times = {v: {"gen": [], "score": [], "train": []} for v in values}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for v in order:
            setattr(model, args.attr, values[v])
            t0 = time.perf_counter()
            batch = learner.rollout()
            times[v]["gen"].append(time.perf_counter() - t0)
        state = host.get_state(policy)
        for v in order:
            setattr(model, args.attr, values[v])
            host.set_state(policy, state)
            t0 = time.perf_counter()
            ev = learner.evaluate(batch)
            adv = learner.advantages(batch, ev)
            t1 = time.perf_counter()
            learner.train(batch, ev, adv)
            t2 = time.perf_counter()
            times[v]["score"].append(t1 - t0)
            times[v]["train"].append(t2 - t1)
        learner.step += 1
    out = {"size": args.size, "dtype": args.dtype, "attr": args.attr, "A": values["A"], "B": values["B"],
           "rounds": args.rounds, "threads": args.threads,
           "median_s": {v: {k: round(statistics.median(x), 4) for k, x in t.items()} for v, t in times.items()},
           "ratio_b_over_a": {k: round(statistics.median(b / a for a, b in zip(times["A"][k], times["B"][k])), 3)
                              for k in ("gen", "score", "train")}}
    return ppo_step.emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
