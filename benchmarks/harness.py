"""What the benchmark scripts share.

    rss_mib, peak_rss_mib     this process's resident memory now / at its peak, MiB
    emit                      print a result as JSON (and write it to a file)
    run_script                a benchmark script in a process of its own; its JSON result
    workdir                   the workload cache folder (default $TMPDIR/marl-ray-bench)
    build_workload            the reference workload's base, reward adapter and prompts
    make_config               the reference workload's run config
    start                     the runtime (in-process or Ray) and a Learner for a config -> Started
    ab_pairs, ratio_summary   alternating A/B process pairs, per-pair ratios, their median/min/max
    spread                    median, min, max of a list of figures

Nothing from torch or marl_ray is imported at module level: trl_peer.py (in .venv-trl, without
marl_ray) can import this module too.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ------------------------------------------------------------------ memory, results
def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory (getrusage ru_maxrss), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict, path: str | None = None) -> int:
    """Print a benchmark's result as JSON, also to `path` when given; 0, the exit status."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0


def run_script(script: str, options: list[str], out: Path, env: dict | None = None) -> dict:
    """benchmarks/`script` with `options` in a process of its own on this interpreter; the JSON it
    writes to `out` (passed as --json). Exits with the tail of its stderr if it fails."""
    cmd = [sys.executable, str(HERE / script), *options, "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def spread(xs, digits: int | None = None) -> dict | None:
    """{"median", "min", "max", "all"} of the figures that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    r = (lambda x: round(x, digits)) if digits is not None else (lambda x: x)
    return {"median": r(statistics.median(xs)), "min": r(min(xs)), "max": r(max(xs)), "all": [r(x) for x in xs]}


# ------------------------------------------------------------------ the reference workload
def workdir(path: str | None = None) -> Path:
    """The folder the workload is cached in (created): `path`, or $TMPDIR/marl-ray-bench."""
    work = Path(path or os.path.join(tempfile.gettempdir(), "marl-ray-bench"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def build_workload(work: Path, size: str, n_prompts: int, seed: int = 0):
    """(base, reward adapter, prompts file) in `work`, built once per size: the seeded tiny Llama
    and tokenizer, a TRL-format reward adapter (LoRA r16/a32 on q, v + score head, random), and
    `n_prompts` prompts of 16 random token ids (rewritten each call)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from marl_ray.data.domain import corpus, write_jsonl
    from marl_ray.data.tiny import build_llama, build_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = work / f"base-{size}"
    if not (base / "config.json").exists():
        tok = build_tokenizer(corpus(3000, seed=0), vocab_size=512)
        build_llama(size, seed=0, vocab_size=512).save_pretrained(base)
        tok.save_pretrained(base)
    rm = work / f"rm-{size}"
    if not (rm / "adapter_config.json").exists():
        sc = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        sc.config.pad_token_id = 0
        peft_rm = get_peft_model(sc, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in peft_rm.named_parameters():
                if "lora_B" in n or "score" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_rm.save_pretrained(rm)
        del sc, peft_rm
    rng = random.Random(seed)
    prompts = work / "prompts.jsonl"
    write_jsonl([{"input_ids": [rng.randrange(4, 512) for _ in range(16)]} for _ in range(n_prompts)], prompts)
    return base, rm, prompts


_AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def make_config(base, rm, prompts, out_dir, *, policies: int = 1, quant: str = "none", dtype: str = "fp32",
                runtime: str = "inprocess", threads: float = 2, backend: str = "hf",
                gradient_checkpointing: str = "auto", micro_batch_size: int | None = None,
                rollout_logprobs: str = "auto"):
    """The reference workload's PPORunConfig: `policies` policies (p0, p1, ...) on one base, each
    16 prompts x 32 sampled tokens per iteration, 4 epochs over minibatches of 8, one host.
    gradient_checkpointing / rollout_logprobs: auto|on|off."""
    from marl_ray.config import PPORunConfig, load_config

    pols = [{"name": f"p{i}", "reward": "rm", "lr": 1.41e-5, "init_kl_coef": 0.2, "adaptive_kl": True,
             "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
            for i in range(policies)]
    return load_config(PPORunConfig, base={
        "model": {"base": str(base), "quantization": quant, "dtype": dtype,
                  "gradient_checkpointing": _AUTO_ON_OFF[gradient_checkpointing]},
        "rewards": [{"name": "rm", "path": str(rm)}],
        "policies": pols,
        "generation": {"max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "backend": backend},
        "ppo": {"steps": 1000, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "gamma": 1.0, "lam": 0.95,
                "micro_batch_size": micro_batch_size, "rollout_logprobs": _AUTO_ON_OFF[rollout_logprobs],
                "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "max_grad_norm": None},
        "cluster": {"runtime": runtime, "num_hosts": 1, "host_num_cpus": threads, "rollout_workers": 1},
        "data": {"prompts": str(prompts), "max_prompt_tokens": 16},
        "run": {"out_dir": str(out_dir), "tensorboard": False, "progress": False, "seed": 0},
    })


# ------------------------------------------------------------------ the runtime
@dataclass
class Started:
    """A Learner on a started runtime; `shutdown()` stops what `start` started."""

    learner: object  # marl_ray.train.loop.Learner
    actors: object  # marl_ray.runtime.placement.Actors
    ray: bool

    def info(self, i: int = 0) -> dict:
        """Host i's report (ModelHost.info)."""
        from marl_ray.runtime.handles import get

        return get(self.learner.hosts[i].info.remote())

    def host(self, i: int = 0):
        """The in-process ModelHost object itself (in-process runtime only)."""
        if self.ray:
            raise RuntimeError("the hosts are Ray actors: no host object in this process")
        return self.learner.hosts[i]._obj

    def shutdown(self):
        if not self.ray:
            return
        import ray

        from marl_ray.runtime.placement import shutdown_actors

        shutdown_actors(list(self.learner.workers) + list(self.learner.hosts.hosts), self.actors.pg)
        ray.shutdown()


def start(cfg, seed: int = 0) -> Started:
    """Model host(s) and rollout workers for `cfg` (cfg.cluster.runtime: "inprocess", or "ray": a
    private local Ray on 127.0.0.1), and a Learner over them."""
    from marl_ray.runtime import placement
    from marl_ray.train.loop import Learner

    ray = cfg.cluster.runtime == "ray"
    if ray:
        placement.init_ray(None, num_cpus=max(2, int(round(cfg.cluster.host_num_cpus))))
        actors = placement.start_actors(cfg, seed=seed)
    else:
        actors = placement.start_inprocess(cfg, seed=seed)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host, host_nodes=actors.host_nodes,
                      respawn_worker=actors.respawn_worker)
    return Started(learner, actors, ray)


# ------------------------------------------------------------------ A/B process pairs
def ab_pairs(run, a: str, b: str, pairs: int, keys: dict[str, str]) -> list[dict]:
    """`pairs` rounds of run(a, i) and run(b, i) (each returns a result dict, e.g. from run_script),
    in alternating order so that neither always goes first. Per pair: {a: figures, b: figures,
    "ratio": b / a of each}, where figures = {name: result[key] for name, key in keys.items()}."""
    out = []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        res = {v: run(v, i) for v in order}
        fig = {v: {name: res[v][key] for name, key in keys.items()} for v in (a, b)}
        fig["ratio"] = {name: fig[b][name] / fig[a][name] for name in keys}
        out.append(fig)
        print(f"pair {i + 1}/{pairs}: " + ", ".join(f"{n} {r:.3f}" for n, r in fig["ratio"].items())
              + f" ({b} / {a})", file=sys.stderr, flush=True)
    return out


def ratio_summary(pairs: list[dict], digits: int = 3) -> dict:
    """Median, min and max over the pairs of each ratio of `ab_pairs`."""
    names = pairs[0]["ratio"] if pairs else {}
    summary = {}
    for name in names:
        s = spread([p["ratio"][name] for p in pairs], digits)
        s.pop("all")
        summary[name] = s
    return summary
