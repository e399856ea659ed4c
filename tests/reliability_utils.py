"""Helpers for tests/train/test_resilience.py and tests/runtime/test_node_loss.py: tiny assets, run configs, comparisons, process hygiene.

Everything is local and seeded (no downloads). Ray, where used, binds to 127.0.0.1 and keeps its
files under a private temp dir (RAY_TMPDIR), so the processes it started can be found (by that
marker) and stopped by pid: never `ray stop`, which would also stop other engineers' Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from corpus import PROMPTS as CORPUS_PROMPTS
from corpus import REVIEWS, write_reward_adapter

REPO = Path(__file__).resolve().parents[1]

# 20 distinct prompts: with 2 rollout workers each shard holds 10, so 4 steps of batch_size 4
# (2 prompts per worker per step) stay within one pass over every shard: no prompt is due twice.
PROMPTS = CORPUS_PROMPTS[:20]
TEXTS = REVIEWS * 6

# Metric keys that measure wall time, not the computation.
VOLATILE = ("time/", "perf/")


# ------------------------------------------------------------------ assets
def build_chat_base(folder: Path) -> Path:
    """A tiny Llama base whose tokenizer has a chat template, saved to `folder`."""
    from marl_ray.data.tiny import build_llama, build_tokenizer

    tok = build_tokenizer(TEXTS, vocab_size=300, chat=True)
    build_llama("tiny", seed=0, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def build_assets(root: Path) -> dict:
    """A tiny Llama base, another base (same architecture, seed 1), a TRL-format reward adapter
    (SEQ_CLS LoRA + score head via modules_to_save) and a prompts JSONL, all under `root`."""
    from marl_ray.data.tiny import build_tiny

    root = Path(root)
    base = build_tiny(root / "base", texts=TEXTS, size="tiny", seed=0)
    other = build_tiny(root / "other_base", texts=TEXTS, size="tiny", seed=1)
    write_reward_adapter(base, root / "reward")
    prompts = write_prompts(root / "prompts.jsonl", PROMPTS)
    return {"base": str(base), "other_base": str(other), "reward": str(root / "reward"), "prompts": str(prompts),
            "root": str(root)}


def write_prompts(path: Path, prompts) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def run_config(assets: dict, out_dir, policies=("up", "down"), **sections) -> dict:
    """A tiny PPO config dict (in-process runtime, 4 steps, a checkpoint every step); `sections`
    extend or replace sections (a dict merges into the section, anything else replaces it)."""
    specs = {"up": {"reward_weight": 1.0}, "down": {"reward_weight": -1.0}}
    cfg = {
        "model": {"base": assets["base"]},
        "rewards": [{"name": "rm", "path": assets["reward"]}],
        "policies": [{"name": p, "reward": "rm", "lr": 1.0e-3, "lora": {"r": 4, "alpha": 8},
                      **specs.get(p, {})} for p in policies],
        "generation": {"max_new_tokens": 6},
        "ppo": {"steps": 4, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"runtime": "inprocess", "rollout_workers": 2, "host_num_cpus": 1, "max_restarts": 2},
        "data": {"prompts": assets["prompts"]},
        "run": {"out_dir": str(out_dir), "save_every": 1, "keep_last": 2, "tensorboard": False,
                "progress": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def load(cfg: dict):
    from marl_ray.config import PPORunConfig, load_config

    return load_config(PPORunConfig, base=cfg)


def write_yaml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ comparisons
def metrics_by_step(out_dir) -> dict[tuple[int, str], dict]:
    """(step, policy) -> that line of OUT/metrics.jsonl; a (step, policy) twice is an error."""
    from marl_ray.metrics import read_metrics

    out = {}
    for row in read_metrics(Path(out_dir) / "metrics.jsonl"):
        key = (row["step"], row["policy"])
        assert key not in out, f"metrics.jsonl has step {key[0]} of policy {key[1]!r} twice"
        out[key] = row
    return out


def assert_same_metrics(got: dict, want: dict, rel: float = 1e-5):
    """Every numeric metric (wall-time ones aside) of every (step, policy) agrees within `rel`."""
    assert sorted(got) == sorted(want), f"steps/policies differ: {sorted(got)} vs {sorted(want)}"
    for key, w in want.items():
        g = got[key]
        keys = {k for k in w if not k.startswith(VOLATILE)}
        assert keys == {k for k in g if not k.startswith(VOLATILE)}, f"{key}: metric names differ"
        for k in sorted(keys):
            a, b = g[k], w[k]
            if isinstance(b, (int, float)) and not isinstance(b, bool):
                if math.isnan(b):
                    assert math.isnan(a), f"{key} {k}: {a} vs NaN"
                    continue
                assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), f"{key} {k}: {a} vs {b}"
            else:
                assert a == b, f"{key} {k}: {a!r} vs {b!r}"


def policy_tensors(folder) -> dict:
    """LoRA tensors and value head of a saved policy folder (prefixed 'lora.' / 'head.')."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {f"lora.{k}": v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    out.update({f"head.{k}": v for k, v in load_file(str(folder / "value_head.safetensors")).items()})
    return out


def assert_same_policies(a_dir, b_dir, names, atol: float = 1e-6):
    import torch

    for name in names:
        a, b = policy_tensors(Path(a_dir) / name), policy_tensors(Path(b_dir) / name)
        assert sorted(a) == sorted(b), f"policy {name}: tensor names differ"
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (
                f"policy {name} {k}: max diff {float((a[k] - b[k]).abs().max())}")


def assert_ledger_clean(ledger: list[dict], steps: int, batch_size: int):
    """One entry per step, in order, each with batch_size distinct prompt ids, none used twice."""
    assert [e["step"] for e in ledger] == list(range(steps)), ledger
    seen = []
    for e in ledger:
        assert len(e["prompt_ids"]) == batch_size, f"step {e['step']}: {e['prompt_ids']}"
        seen += e["prompt_ids"]
    assert len(seen) == len(set(seen)), f"a prompt id used twice: {ledger}"


def tree_digest(folder) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (to show nothing changed)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ processes
def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_cli(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m marl_ray ARGS` in its own session, output to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "marl_ray", *args], cwd=str(REPO), env=env or cli_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.02, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def procs_with(marker: str) -> list:
    """Live (non-zombie) processes whose command line mentions `marker`, this one excluded."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and p.info["cmdline"] and any(marker in a for a in p.info["cmdline"]) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def ray_procs(temp_dir: str) -> list:
    """Live processes of the Ray whose RAY_TMPDIR is `temp_dir`, this one excluded: those that name
    it on their command line (GCS, raylet, agents) and those that inherited it in their environment
    (actor workers, whose command line Ray rewrites to "ray::ModelHost" and the like)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(temp_dir in a for a in p.info["cmdline"] or ()) or p.environ().get("RAY_TMPDIR") == temp_dir:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def stop_ray_procs(temp_dir: str, grace: float = 20.0) -> list:
    """Wait up to `grace` s for that Ray's processes to exit; SIGTERM/SIGKILL the rest (by pid).
    Returns the ones that had to be killed."""
    deadline = time.monotonic() + grace
    while ray_procs(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = ray_procs(temp_dir)
    kill_procs(left)
    return left


def private_ray_env(temp_dir: str) -> dict:
    """Environment of a private loopback Ray: its temp dir and a fresh random auth token (mode 600)
    inside it, never ~/.ray/auth_token."""
    token = Path(temp_dir) / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    return {"RAY_TMPDIR": temp_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


def _reload_ray_auth():
    """Make this process re-read RAY_AUTH_MODE / the token (Ray caches both when first imported),
    as ray.init itself does when it turns token auth on."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def private_local_ray(num_cpus: int = 2):
    """A private Ray on 127.0.0.1 for this process (a temp dir and a throw-away auth token of its
    own, never ~/.ray/auth_token); every process it started is gone afterwards. Yields its temp dir."""
    import ray

    from marl_ray.runtime.placement import init_ray

    assert not ray.is_initialized()
    tmp = tempfile.mkdtemp(prefix="rrel", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**private_ray_env(tmp), "RAY_ADDRESS": None, "RAY_AUTH_TOKEN": None}
    saved = {k: os.environ.get(k) for k in env}

    def setenv(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_auth()

    setenv(env)
    try:
        init_ray(num_cpus=num_cpus)
        yield tmp
    finally:
        ray.shutdown()
        setenv(saved)
        left = stop_ray_procs(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes still running after shutdown: {[p.pid for p in left]}"


def kill_procs(procs, timeout: float = 10.0):
    """SIGTERM, then SIGKILL, exactly these processes."""
    import psutil

    procs = [p for p in procs if p.is_running()]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
