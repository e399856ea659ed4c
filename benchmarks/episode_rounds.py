"""Turns per second of episode rounds: every pending turn of a round in ONE mixed-adapter `host.sample` call,
against each role's turns in a call of their own (same episodes, same seeds), on one in-process host.

Two policies play a two-role environment (the roles alternate, `--turns` per episode; half the data rows
start with each role, so every round holds both roles' turns), G episodes of each data row. Both ways run the same rounds; only how a round's turns are grouped into calls differs.
Prints JSON: turns/s of each way (median of --repeats), their ratio, and the setting.

    python benchmarks/episode_rounds.py [--size tiny|small|medium] [--rows 8] [--generations 4] [--turns 4]
        [--max-new-tokens 16] [--repeats 3] [--threads N]

Run it on a quiet machine: a timing taken while another job runs is not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ENV = '''
class Alternate:
    roles = ["first", "second"]
    turns = {turns}

    def reset(self, **row):
        self.n = 0
        self.start = row["start"]  # half the rows start with each role: every round has both roles' turns

    def next_role(self):
        return None if self.n >= self.turns else self.roles[(self.n + self.start) % 2]

    def step(self, role, message):
        self.n += 1

    def rewards(self):
        return {{"first": 0.0, "second": 0.0}}
'''


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch

    from marl_ray.config import PPORunConfig, load_config
    from marl_ray.data.tiny import build_llama, build_tokenizer
    from marl_ray.data.domain import prompts as domain_prompts
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="episode_rounds_"))
    texts = domain_prompts(200, seed=0)
    tok = build_tokenizer(texts, vocab_size=512, chat=True)
    build_llama(args.size, seed=0, vocab_size=len(tok), max_position_embeddings=1024).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rows = [{"prompt": [{"role": "user", "content": t}], "start": i % 2} for i, t in enumerate(texts[:args.rows])]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "env.py").write_text(ENV.format(turns=args.turns))
    policy = {"reward": [], "algorithm": "grpo", "num_generations": args.generations, "lora": {"r": 8, "alpha": 16}}
    cfg = load_config(PPORunConfig, base={
        "model": {"base": str(root / "base")},
        "policies": [{"name": "a", **policy}, {"name": "b", **policy}],
        "generation": {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                       "stop_at_eos": True},
        "episodes": {"environment": f"{root / 'env.py'}:Alternate", "max_turns": args.turns,
                     "max_tokens": 8 * args.turns * args.max_new_tokens,
                     "players": [{"role": "first", "policy": "a"}, {"role": "second", "policy": "b"}]},
        "ppo": {"steps": 1, "batch_size": args.rows, "mini_batch_size": args.rows, "rollout_logprobs": False},
        "cluster": {"runtime": "inprocess", "rollout_workers": 1, "host_num_cpus": args.threads or 1},
        "data": {"prompts": str(root / "rows.jsonl"), "max_prompt_tokens": 256},
        "run": {"out_dir": str(root / "run"), "report_to": "none", "progress": False},
    })
    actors = start_inprocess(cfg, seed=0)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    runner = learner.episodes
    pids = list(range(args.rows))

    def once(by_role: bool) -> tuple[float, int]:
        episodes = [runner.start(pid, 0, i, 0) for i, pid in enumerate(pids) for _ in range(runner.G)]
        t = time.perf_counter()
        runner.play(episodes, seed=1234, hosts=learner.hosts, by_role=by_role)
        return time.perf_counter() - t, sum(ep.turns for ep in episodes)

    once(False), once(True)  # warm-up
    out = {}
    for name, by_role in (("one_call_per_round", False), ("one_call_per_role", True)):
        runs = [once(by_role) for _ in range(args.repeats)]
        turns = runs[0][1]
        out[name] = {"turns": turns, "seconds": [round(s, 4) for s, _ in runs],
                     "turns_per_s": round(turns / statistics.median(s for s, _ in runs), 2)}
    out["speedup"] = round(out["one_call_per_round"]["turns_per_s"] / out["one_call_per_role"]["turns_per_s"], 3)
    out["setting"] = {"size": args.size, "rows": args.rows, "generations": args.generations, "turns": args.turns,
                      "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                      "episodes": args.rows * args.generations}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
