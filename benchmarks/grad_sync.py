"""Why several hosts sum their gradients among themselves: the projection on paper; prints JSON.

    python benchmarks/grad_sync.py

For 7B and 70B Llama bases with LoRA r=16 on every linear layer: the bytes one policy's gradients
would move per RL step through the driver's node if the driver summed them (N hosts' gradients in,
the sum out to N hosts) against the bytes per host of the ring allreduce the hosts run among
themselves (`runtime/collective.py`), and the time each takes at 100 Gbit/s per node
(docs/cluster.md has the formula). The driver's measured bytes per step are in
benchmarks/driver_bytes.py, which also takes its loopback cluster and small base from here.
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
import sys
import tempfile
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


# ------------------------------------------------------------------ the small base and a run's config
def assets(workdir: Path) -> dict:
    from marl_ray.data import domain
    from marl_ray.data.tiny import build_tiny

    base = workdir / "base"
    if not (base / "config.json").exists():
        build_tiny(base, texts=domain.corpus(400, seed=0), size="small", seed=0)
    reward = workdir / "reward_fn.py"
    reward.write_text(REWARD_PY)
    return {"base": str(base), "reward": f"{reward}:length"}


def config(a: dict, out: Path, hosts: int, r: int, steps: int):
    from marl_ray.config import PPORunConfig, load_config

    lora = {"r": r, "alpha": 2 * r, "target_modules": "all-linear"}
    return load_config(PPORunConfig, base={
        "model": {"base": a["base"]},
        "rewards": [{"name": "len", "function": a["reward"]}],
        "policies": [{"name": "up", "reward": "len", "lr": 1e-4, "lora": lora},
                     {"name": "down", "reward": "len", "reward_weight": -1.0, "lr": 1e-4, "lora": lora}],
        "generation": {"max_new_tokens": 8},
        "ppo": {"steps": steps, "batch_size": 6, "mini_batch_size": 3, "ppo_epochs": 2},
        "cluster": {"num_hosts": hosts, "rollout_workers": hosts, "host_num_cpus": 1},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False, "save_every": 0},
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    out = {"projection": projection()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
