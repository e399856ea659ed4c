"""Helpers for the Ray runtime tests (runtime/test_runtime.py, runtime/test_node_loss.py, test_job_submit.py).

Every Ray process these tests start binds to 127.0.0.1, runs with token auth on (a throw-away
token in a temp file, never ~/.ray/auth_token) and a private temp dir, and is stopped by pid:
never `ray stop`, which would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from corpus import PROMPTS as CORPUS_PROMPTS
from corpus import REVIEWS, write_reward_adapter

VENV_BIN = str(Path(sys.executable).parent)
RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[1]

# Distinct prompts (ids 0..11): two rollout workers x 6 = exactly one epoch of each shard.
PROMPTS = CORPUS_PROMPTS[:12]
TEXTS = REVIEWS * 6

_ASSETS: dict[str, dict] = {}


# ------------------------------------------------------------------ model assets
def tiny_assets(root: Path) -> dict:
    """A tiny Llama base and a TRL-format reward adapter (SEQ_CLS LoRA + score head) under `root`.

    Built once per process (cached by path), seeded, no downloads. Returns {"base", "reward", "prompts"}
    (prompts: a JSONL file of PROMPTS).
    """
    key = str(root)
    if key in _ASSETS:
        return _ASSETS[key]
    from marl_ray.data.tiny import build_tiny

    root = Path(root)
    base = build_tiny(root / "base", texts=TEXTS, size="tiny", seed=0)
    write_reward_adapter(base, root / "reward")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    _ASSETS[key] = {"base": str(base), "reward": str(root / "reward"), "prompts": str(prompts)}
    return _ASSETS[key]


def run_config(assets: dict, out_dir: str, **sections) -> dict:
    """A small two-policy (up/down) PPO config dict on `assets`; `sections` replace/extend sections."""
    cfg = {
        "model": {"base": assets["base"]},
        "rewards": [{"name": "rm", "path": assets["reward"]}],
        "policies": [{"name": "up", "reward": "rm", "lr": 1.0e-3, "lora": {"r": 4, "alpha": 8}},
                     {"name": "down", "reward": "rm", "reward_weight": -1.0, "lr": 1.0e-3,
                      "lora": {"r": 4, "alpha": 8}}],
        "generation": {"max_new_tokens": 6},
        "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"rollout_workers": 1, "host_num_cpus": 1},
        "run": {"out_dir": str(out_dir), "tensorboard": False, "progress": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ ports, env, processes
def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while picked, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def new_token_file(folder: Path) -> Path:
    """A fresh random Ray auth token in `folder`/auth_token (mode 600)."""
    path = Path(folder) / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def ray_env(token_path: Path, **extra) -> dict:
    """Environment for Ray CLI processes: loopback, token auth from `token_path`, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0", "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def short_temp_dir(prefix: str = "rt") -> str:
    """A private Ray temp dir with a short path (Ray's unix sockets live under it)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def procs_with(marker: str, exclude_self: bool = True) -> list:
    """Live processes whose command line mentions `marker` (e.g. a Ray temp dir)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if exclude_self and p.pid == os.getpid():
                continue
            if p.info["cmdline"] and any(marker in a for a in p.info["cmdline"]) and p.status() != "zombie":
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def kill_procs(procs, timeout: float = 10.0):
    """SIGTERM, then SIGKILL what is left, of exactly these processes."""
    import psutil

    procs = [p for p in procs if p.is_running()]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def listening_addresses(procs) -> dict[int, list[str]]:
    """pid -> the addresses its listening TCP sockets are bound to."""
    import psutil

    out = {}
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        addrs = [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
        if addrs:
            out[p.pid] = addrs
    return out


def is_loopback(addr: str) -> bool:
    """127.0.0.0/8, ::1 and the IPv4-mapped ::ffff:127.x.y.z (how gRPC reports a 127.0.0.1 bind)."""
    import ipaddress

    ip = ipaddress.ip_address(addr.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def non_loopback(addr_map: dict[int, list[str]]) -> dict[int, list[str]]:
    """The entries of `addr_map` bound beyond loopback (0.0.0.0, ::, or an interface address)."""
    bad = {pid: [a for a in addrs if not is_loopback(a)] for pid, addrs in addr_map.items()}
    return {pid: addrs for pid, addrs in bad.items() if addrs}


def http_status(url: str, token: str | None = None, timeout: float = 5.0) -> int:
    """HTTP status of GET `url` (with a bearer token if given); 0 when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------ a CLI head
class LocalHead:
    """`ray start --head --block` on loopback with token auth, a private temp dir and free ports.

    `--block` keeps `ray start` in the foreground; SIGTERM to it stops every process of this head
    (and only this head). `stop()` then kills, by pid, anything left that mentions the temp dir.
    """

    def __init__(self, folder: Path, num_cpus: int = 2):
        self.folder = Path(folder)
        self.token_path = new_token_file(self.folder)
        self.token = self.token_path.read_text()
        self.temp_dir = short_temp_dir("rjh")
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = free_ports(4)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = ray_env(self.token_path)
        self.num_cpus = num_cpus
        self.proc = None
        self.log = self.folder / "head.log"
        self.children = []

    def start(self, timeout: float = 90.0) -> "LocalHead":
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}",
               f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--object-store-memory=200000000",
               "--disable-usage-stats"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if (http_status(self.address + "/api/version", self.token) == 200 and port_open(self.agent_port)):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Ray head did not come up in {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def cli(self, *args, timeout: float = 300.0, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `ray ARGS` against this head (its token in the environment); stdout + stderr together."""
        return subprocess.run([RAY, *args], env=env or self.env, cwd=self.folder, capture_output=True, text=True,
                              timeout=timeout)

    def diagnosis(self, lines: int = 15) -> str:
        """Whether `ray start --block` is still running (it exits, taking the head down, when any
        head process dies), the tail of its output and of the session's error logs: for failures."""
        state = "running" if self.proc is not None and self.proc.poll() is None else (
            f"exited with {self.proc.returncode}" if self.proc is not None else "stopped")
        parts = [f"ray start --block: {state}", "head.log: " + "\n".join(self.log.read_text().splitlines()[-lines:])]
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for f in sorted(logs.glob("*.err")) + sorted(logs.glob("dashboard*.log")) if logs.is_dir() else []:
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"{f.name}: " + "\n".join(tail))
        return "\n\n".join(parts)

    def processes(self):
        import psutil

        procs = procs_with(self.temp_dir)
        if self.proc is not None:
            try:
                procs += [p for p in psutil.Process(self.proc.pid).children(recursive=True) if p not in procs]
            except psutil.NoSuchProcess:
                pass
        return procs

    def stop(self, timeout: float = 30.0):
        import psutil

        if self.proc is None:
            return
        self.children = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        psutil.wait_procs([p for p in self.children if p.is_running()], timeout=10)
        kill_procs([p for p in self.children if p.is_running()] + procs_with(self.temp_dir))
        self.proc = None
        if not procs_with(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list:
        return [p for p in self.children if p.is_running() and p.status() != "zombie"] + procs_with(self.temp_dir)


# ------------------------------------------------------------------ a two-node cluster
def _reset_auth_cache():
    """Make Ray's cached config and token loader re-read RAY_AUTH_* from the environment."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # an older Ray caches nothing
        return
    reset_auth_token_state()


@contextlib.contextmanager
def two_node_cluster(auth_dir: Path):
    """Two raylets on 127.0.0.1 (one CPU each), token auth on, a private temp dir; the driver connected.

    The cluster never writes /tmp/ray/ray_current_cluster (which would make a plain `ray.init()` of
    anyone else on this machine join it), and is stopped by pid at the end.
    """
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts anything: loopback only
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_AUTH_MODE", "token")
    Path(auth_dir).mkdir(parents=True, exist_ok=True)
    mp.setenv("RAY_AUTH_TOKEN_PATH", str(new_token_file(Path(auth_dir))))
    mp.delenv("RAY_AUTH_TOKEN", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from marl_ray.runtime.placement import alive_nodes, init_ray

    if ray.is_initialized():
        ray.shutdown()
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # Ray read the env var at import, maybe earlier
    mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    _reset_auth_cache()
    temp_dir = short_temp_dir("rtc")
    c = None
    try:
        agent_port, dashboard_port = free_ports(2)  # not the defaults: other Rays may run on this machine
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp_dir,
            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": agent_port, "object_store_memory": 100 * 1024 * 1024})
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=temp_dir,
                   object_store_memory=100 * 1024 * 1024)
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:")
        init_ray(address=c.address)
        assert len(alive_nodes()) == 2
        yield {"cluster": c, "temp_dir": temp_dir}
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
            if c is not None:
                c.shutdown()
            kill_procs(procs_with(temp_dir))
        finally:
            mp.undo()
            _reset_auth_cache()
        left = procs_with(temp_dir)
        assert not left, f"Ray processes of the test cluster still running: {[p.pid for p in left]}"
        shutil.rmtree(temp_dir, ignore_errors=True)
