"""Gradient summing among the hosts (cluster.grad_sync collective) against through the driver; prints JSON.

    python benchmarks/grad_sync.py                      # about 3 minutes on 2 CPU cores
    python benchmarks/grad_sync.py --projection-only    # the paper projection alone (no Ray)

On a `ray.cluster_utils.Cluster` of 3 raylets on 127.0.0.1 (token auth, a private temp dir, stopped by
pid at the end), a `small` Llama base (H=256, 4 layers, built here, seeded) trains two policies for a
few PPO steps with 1, 2 and 3 model hosts (one per node, a rollout worker each), LoRA on every
linear layer at two ranks, with rows kept on the hosts (`cluster.keep_rows`, the default) and sent by
the driver, gradients summed host to host and (2-3 hosts) through the driver. Reported per configuration:

- driver bytes per RL step: the pickled size of everything the learner received from the hosts and
  sent to them (the samples; the scoring requests and scores; with rows kept on the hosts, the
  advantages once and per minibatch row indices and references, else per minibatch the rows'
  tensors; the driver path also each host's gradients and the summed gradients, put once;
  statistics and checksums), metered in the driver process (`HostGroup.traffic`), averaged over the
  measured steps, by kind (`by_kind_per_step`); prompts and reward texts are not metered;
- gradient bytes per minibatch (fp32 LoRA + value head of one policy) and minibatches per step;
- time/train_s and time/step_s (median over the measured steps).

Then side by sides on 2 hosts at the larger rank, each a fresh set of actors per run, `--pairs` times
alternating: collective against driver (per pair the ratio of median train-phase times, collective /
driver), and rows kept on the hosts against rows sent by the driver (collective; kept / sent).

Finally the projection on paper for 7B and 70B bases (docs/cluster.md has the formula).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REWARD_PY = '''
def length(prompts, completions, **kw):
    return [len(c) / 10.0 for c in completions]
'''


# ------------------------------------------------------------------ projection (no Ray)
def lora_params(hidden: int, inter: int, layers: int, kv_dim: int, r: int) -> int:
    """LoRA parameters of rank r on every linear layer of a Llama decoder (q, k, v, o, gate, up, down)."""
    per_layer = (r * (hidden + hidden) + 2 * r * (hidden + kv_dim) + r * (hidden + hidden)
                 + 2 * r * (hidden + inter) + r * (inter + hidden))
    return per_layer * layers


BASES = {  # Llama-2 7B (MHA) and 70B (GQA, 8 KV heads)
    "7B": dict(hidden=4096, inter=11008, layers=32, kv_dim=4096),
    "70B": dict(hidden=8192, inter=28672, layers=80, kv_dim=1024),
}


def projection(r: int = 16, epochs: int = 4, minibatches: int = 8, link_gbit: float = 100.0) -> list[dict]:
    """Bytes per RL step (one policy) at N hosts: through the driver's node on the driver path
    (2 N G M: N hosts' gradients in, the sum out to N hosts), per host with a ring allreduce
    (2 (N-1)/N G M, fp32; half in bf16), and the time each takes at `link_gbit` per node."""
    out = []
    M = epochs * minibatches
    for name, b in BASES.items():
        P = lora_params(r=r, **b) + b["hidden"] + 1  # + the value head
        G = 4 * P
        for n in (8, 32, 128):
            driver = 2 * n * G * M
            ring = 2 * (n - 1) / n * G * M
            bw = link_gbit * 1e9 / 8
            out.append({"base": name, "lora_r": r, "adapter_params": P, "grad_mb": round(G / 1e6, 1), "hosts": n,
                        "minibatches_per_step": M, "driver_path_gb_through_driver_node": round(driver / 1e9, 1),
                        "collective_gb_per_host": round(ring / 1e9, 2),
                        "collective_bf16_gb_per_host": round(ring / 2e9, 2),
                        f"driver_path_s_at_{link_gbit:g}gbit": round(driver / bw, 1),
                        f"collective_s_at_{link_gbit:g}gbit": round(ring / bw, 2)})
    return out


# ------------------------------------------------------------------ a private loopback cluster
@contextlib.contextmanager
def loopback_cluster(nodes: int):
    """`nodes` raylets on 127.0.0.1 (1 CPU each), token auth with a throw-away token, a private temp dir;
    every process it started is stopped by pid at the end (never `ray stop`)."""
    tmp = tempfile.mkdtemp(prefix="rgs", dir="/tmp")
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from marl_ray.runtime.placement import init_ray

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray._private.utils.write_ray_address = lambda *a, **k: None  # never advertise this cluster to others
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s)
    agent, dash = (s.getsockname()[1] for s in ports)
    for s in ports:
        s.close()
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": tmp,
            "dashboard_host": "127.0.0.1", "dashboard_port": dash, "dashboard_agent_listen_port": agent,
            "object_store_memory": 150 * 1024 * 1024})
        for _ in range(nodes - 1):
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=tmp, object_store_memory=150 * 1024 * 1024)
        c.wait_for_nodes()
        init_ray(address=c.address)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.shutdown()
        _stop_procs_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_procs_of(marker: str):
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in a for a in p.info["cmdline"] or ()):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


# ------------------------------------------------------------------ one configuration
def assets(workdir: Path) -> dict:
    from marl_ray.data import domain
    from marl_ray.data.tiny import build_tiny

    base = workdir / "base"
    if not (base / "config.json").exists():
        build_tiny(base, texts=domain.corpus(400, seed=0), size="small", seed=0)
    reward = workdir / "reward_fn.py"
    reward.write_text(REWARD_PY)
    return {"base": str(base), "reward": f"{reward}:length"}


def config(a: dict, out: Path, hosts: int, r: int, sync: str, steps: int, keep_rows: bool = True):
    from marl_ray.config import PPORunConfig, load_config

    lora = {"r": r, "alpha": 2 * r, "target_modules": "all-linear"}
    return load_config(PPORunConfig, base={
        "model": {"base": a["base"]},
        "rewards": [{"name": "len", "function": a["reward"]}],
        "policies": [{"name": "up", "reward": "len", "lr": 1e-4, "lora": lora},
                     {"name": "down", "reward": "len", "reward_weight": -1.0, "lr": 1e-4, "lora": lora}],
        "generation": {"max_new_tokens": 8},
        "ppo": {"steps": steps, "batch_size": 6, "mini_batch_size": 3, "ppo_epochs": 2},
        "cluster": {"num_hosts": hosts, "rollout_workers": hosts, "host_num_cpus": 1, "grad_sync": sync,
                    "keep_rows": keep_rows},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False, "save_every": 0},
    })


def measure(a: dict, workdir: Path, hosts: int, r: int, sync: str, steps: int, warmup: int = 1,
            keep_rows: bool = True) -> dict:
    from marl_ray.runtime.handles import get
    from marl_ray.runtime.host_group import Traffic
    from marl_ray.runtime.placement import shutdown_actors, start_actors
    from marl_ray.train.loop import Learner

    cfg = config(a, workdir / f"out-{hosts}-{r}-{sync}-{keep_rows}", hosts, r, sync, warmup + steps, keep_rows)
    actors = start_actors(cfg, seed=0)
    try:
        learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host, host_nodes=actors.host_nodes)
        for _ in range(warmup):
            learner.run_step()
        traffic, times = Traffic(), []
        learner.hosts.traffic = traffic
        for _ in range(steps):
            times.append(learner.run_step()["up"])
        sums = learner.checksums()
        assert all(len(set(v)) == 1 for v in sums.values()), sums
        state = get(actors.hosts[0].get_state.remote("up"))
        grad_bytes = sum(t.numel() * 4 for t in state.weights.values())
        g = cfg.ppo
        mb = g.ppo_epochs * (g.batch_size // g.mini_batch_size) * len(cfg.policies)
        return {"hosts": hosts, "lora_r": r, "grad_sync": sync if hosts > 1 else "one host (nothing to sum)",
                "collective": learner.hosts.collective, "rows": "kept on the hosts" if keep_rows else "sent by the driver",
                "grad_bytes_per_minibatch": grad_bytes,
                "minibatches_per_step": mb,
                "driver_bytes_per_step": traffic.total // steps,
                "driver_sent_per_step": traffic.sent // steps, "driver_received_per_step": traffic.received // steps,
                "by_kind_per_step": {k: v // steps for k, v in sorted(traffic.by_kind.items())},
                "train_s_median": statistics.median(m["time/train_s"] for m in times),
                "step_s_median": statistics.median(m["time/step_s"] for m in times)}
    finally:
        shutdown_actors(actors.workers + actors.hosts, actors.pg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64", help="LoRA ranks (all-linear), comma-separated")
    ap.add_argument("--hosts", default="1,2,3")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per configuration (after 1 warm-up)")
    ap.add_argument("--pairs", type=int, default=3, help="collective/driver pairs of the 2-host side by side")
    ap.add_argument("--pair-steps", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--projection-only", action="store_true")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    out = {"projection": projection()}
    if not args.projection_only:
        import torch

        torch.set_num_threads(1)
        ranks = [int(x) for x in args.ranks.split(",")]
        host_counts = [int(x) for x in args.hosts.split(",")]
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="grad_sync_"))
        a = assets(workdir)
        rows, pairs, row_pairs = [], [], []
        with loopback_cluster(max(host_counts + [2])):
            for r in ranks:
                for n in host_counts:
                    paths = [("collective", True), ("collective", False)] + ([("driver", True)] if n > 1 else [])
                    for sync, keep in paths:
                        rows.append(measure(a, workdir, n, r, sync, args.steps, keep_rows=keep))
                        print(json.dumps(rows[-1]), file=sys.stderr)
            for i in range(args.pairs):
                order = ("collective", "driver") if i % 2 == 0 else ("driver", "collective")
                got = {s: measure(a, workdir, 2, max(ranks), s, args.pair_steps) for s in order}
                pairs.append({"pair": i, "order": list(order),
                              "train_s": {s: got[s]["train_s_median"] for s in order},
                              "step_s": {s: got[s]["step_s_median"] for s in order},
                              "train_ratio_collective_over_driver":
                                  got["collective"]["train_s_median"] / got["driver"]["train_s_median"],
                              "step_ratio_collective_over_driver":
                                  got["collective"]["step_s_median"] / got["driver"]["step_s_median"]})
                print(json.dumps(pairs[-1]), file=sys.stderr)
            for i in range(args.pairs):  # rows kept on the hosts against rows sent by the driver (collective)
                order = (True, False) if i % 2 == 0 else (False, True)
                got = {k: measure(a, workdir, 2, max(ranks), "collective", args.pair_steps, keep_rows=k) for k in order}
                row_pairs.append({"pair": i, "order": ["kept" if k else "sent" for k in order],
                                  "train_s": {"kept": got[True]["train_s_median"], "sent": got[False]["train_s_median"]},
                                  "step_s": {"kept": got[True]["step_s_median"], "sent": got[False]["step_s_median"]},
                                  "train_ratio_kept_over_sent": got[True]["train_s_median"] / got[False]["train_s_median"],
                                  "step_ratio_kept_over_sent": got[True]["step_s_median"] / got[False]["step_s_median"]})
                print(json.dumps(row_pairs[-1]), file=sys.stderr)
        out["driver_bytes"] = rows
        if row_pairs:
            out["rows_kept_vs_sent_2_hosts"] = {
                "lora_r": max(ranks), "pairs": row_pairs,
                "train_ratio_median": statistics.median(p["train_ratio_kept_over_sent"] for p in row_pairs),
                "step_ratio_median": statistics.median(p["step_ratio_kept_over_sent"] for p in row_pairs)}
        ratios = [p["train_ratio_collective_over_driver"] for p in pairs]
        out["side_by_side_2_hosts"] = {
            "lora_r": max(ranks), "pairs": pairs,
            "train_ratio_median": statistics.median(ratios) if ratios else None,
            "train_ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "step_ratio_median": statistics.median(p["step_ratio_collective_over_driver"] for p in pairs)
            if pairs else None}
        out["setup"] = {"model": "small Llama (H=256, 4 layers), fp32, LoRA all-linear", "cpus": os.cpu_count(),
                        "nodes": "ray.cluster_utils.Cluster on 127.0.0.1, 1 CPU each, one host per node",
                        "ppo": "batch 6 prompts x 2 policies, mini_batch 3, 2 epochs, 8 new tokens",
                        "command": "python benchmarks/grad_sync.py " + " ".join(argv or sys.argv[1:])}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
