"""Bytes through the driver per RL step, counted where they cross: prints JSON.

    python benchmarks/driver_bytes.py                    # 1, 2, 3 hosts x LoRA r 8, 64; about 6 minutes on 2 cores
    python benchmarks/driver_bytes.py --hosts 1 --ranks 8 --steps 3

A real `run_ppo` (the learner's `fit`: snapshots, replica checks, every call a step makes) on a
`ray.cluster_utils.Cluster` of loopback raylets (benchmarks/grad_sync.py's: token auth, a private temp
dir, every process stopped by pid), two policies, LoRA on every linear layer. In the driver process
every `ray.get` result, every `ray.put` value and the arguments of every actor call are measured with
Ray's own serializer (`total_bytes` of what it would send: tensors, pickled objects, references), not
by a meter kept beside the code. A step's bytes are those between two `on_step` calls (the step, its
snapshot and replica check); the first `--skip` steps (start-up, compiling) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grad_sync  # noqa: E402  (the loopback cluster and the small base)


class Meter:
    """Wraps ray.get, ray.put and ActorMethod._remote in this process; counts serialized bytes by direction."""

    def __init__(self):
        self.sent = self.received = self.calls = 0
        self._undo = []

    def size(self, obj) -> int:
        import ray

        ctx = ray._private.worker.global_worker.get_serialization_context()
        return int(ctx.serialize(obj).total_bytes)

    def __enter__(self):
        import ray
        from ray.actor import ActorMethod

        real_get, real_put, real_remote = ray.get, ray.put, ActorMethod._remote
        meter = self

        def get(refs, *a, **k):
            out = real_get(refs, *a, **k)
            meter.received += meter.size(out)
            return out

        def put(value, *a, **k):
            meter.sent += meter.size(value)
            return real_put(value, *a, **k)

        def remote(method, args=None, kwargs=None, **options):
            meter.calls += 1
            meter.sent += meter.size((list(args or ()), dict(kwargs or {})))
            return real_remote(method, args=args, kwargs=kwargs, **options)

        ray.get, ray.put, ActorMethod._remote = get, put, remote
        self._undo = [(ray, "get", real_get), (ray, "put", real_put), (ActorMethod, "_remote", real_remote)]
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._undo:
            setattr(owner, name, value)

    @property
    def total(self) -> int:
        return self.sent + self.received


def measure(a: dict, workdir: Path, hosts: int, r: int, steps: int, skip: int) -> dict:
    import resource

    from marl_ray.stages.ppo import run_ppo

    cfg = grad_sync.config(a, workdir / f"out-{hosts}-{r}", hosts, r, skip + steps)
    marks = []
    with Meter() as meter:
        run_ppo(cfg, keep_ray=True, on_step=lambda step, m: marks.append((meter.sent, meter.received, meter.calls)))
    per = [(s1 - s0, r1 - r0, c1 - c0) for (s0, r0, c0), (s1, r1, c1) in zip(marks[skip - 1:], marks[skip:])]
    g = cfg.ppo
    return {"hosts": hosts, "lora_r": r, "steps_counted": len(per),
            "minibatches_per_step": g.ppo_epochs * (g.batch_size // g.mini_batch_size) * len(cfg.policies),
            "driver_bytes_per_step": statistics.mean(s + r_ for s, r_, _ in per),
            "sent_per_step": statistics.mean(s for s, _, _ in per),
            "received_per_step": statistics.mean(r_ for _, r_, _ in per),
            "actor_calls_per_step": statistics.mean(c for _, _, c in per),
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64", help="LoRA ranks (all-linear), comma-separated")
    ap.add_argument("--hosts", default="1,2,3")
    ap.add_argument("--steps", type=int, default=2, help="steps counted per configuration")
    ap.add_argument("--skip", type=int, default=2, help="steps run first and not counted")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    import torch

    from marl_ray import console

    console.setup(quiet=True)  # stdout carries the JSON alone
    torch.set_num_threads(1)
    ranks = [int(x) for x in args.ranks.split(",")]
    host_counts = [int(x) for x in args.hosts.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="driver_bytes_"))
    a = grad_sync.assets(workdir)
    rows = []
    with grad_sync.loopback_cluster(max(host_counts)):
        for r in ranks:
            for n in host_counts:
                rows.append(measure(a, workdir, n, r, args.steps, args.skip))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"driver_bytes": rows, "setup": {
        "model": "small Llama (H=256, 4 layers), fp32, LoRA all-linear, two policies", "cpus": os.cpu_count(),
        "nodes": "ray.cluster_utils.Cluster on 127.0.0.1, 1 CPU each, one host per node",
        "ppo": "batch 6 prompts x 2 policies, mini_batch 3, 2 epochs, 8 new tokens; save_every 0",
        "command": "python benchmarks/driver_bytes.py " + " ".join(argv or sys.argv[1:])}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
