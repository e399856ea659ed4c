"""Two policies in one episode: a proposer writes an addition problem, a solver answers it (twice).

The solver is rewarded for each right answer (the fraction of its two attempts that are right); the
proposer is rewarded when the solver is right about half the time: 1 when exactly one of the two
attempts is right, 0 otherwise (too easy or too hard), and 0 for a text that holds no "a + b".
Each policy learns from its own turns only: the proposer's row is its problem, the solver's rows
hold its answers with the problem and its first attempt as context.

    python examples/episodes/proposer_solver.py OUT_DIR [--base PATH] [--steps N] [--self-play]

--self-play: one policy plays both roles (players: both roles -> the same policy).
Without --base it builds a tiny local base (random weights, ChatML).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve()


class ProposerSolver:
    roles = ["proposer", "solver"]

    def reset(self, **row):
        self.task = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        self.problem = None  # (a, b) once proposed
        self.answers = []  # the solver's attempts: right or not
        self.log = {"proposer": [], "solver": []}  # what each role saw after its first prompt

    def next_role(self):
        if not self.log["proposer"]:
            return "proposer"
        if self.problem is None or len(self.answers) >= 2:
            return None  # no problem to solve, or two attempts made
        return "solver"

    def step(self, role, message):
        self.log[role].append(message)
        if role == "proposer":
            m = re.search(r"(\d{1,4})\s*\+\s*(\d{1,4})", message["content"])
            self.problem = (int(m.group(1)), int(m.group(2))) if m else None
            return None
        numbers = re.findall(r"-?\d+", message["content"])
        self.answers.append(bool(numbers) and int(numbers[-1]) == sum(self.problem))
        if len(self.answers) < 2:
            self.log["solver"].append({"role": "user", "content": "Once more, from scratch."})

    def view(self, role):
        """The proposer sees its task; the solver the problem and its own attempts (nothing of the other's)."""
        if role == "proposer":
            return [{"role": "user", "content": self.task}] + self.log["proposer"]
        a, b = self.problem
        return [{"role": "user", "content": f"Solve: {a} + {b}"}] + self.log["solver"]

    def rewards(self):
        right = sum(self.answers)
        return {"proposer": 1.0 if self.problem is not None and right == 1 else 0.0,
                "solver": right / len(self.answers) if self.answers else 0.0}


def make_assets(out: Path, n: int = 32, seed: int = 0) -> dict:
    """A tiny ChatML base and n proposer tasks as {prompt} rows."""
    from marl_ray.data.tiny import build_llama, build_tokenizer

    rows = [{"prompt": [{"role": "user", "content": f"Write one addition problem with numbers below {10 * (k % 5 + 1)}, "
                                                     "like 12 + 30."}]} for k in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"][0]["content"] for r in rows] + [f"{a} + {b} = {a + b}" for a in range(20) for b in range(5)]
    tok = build_tokenizer(texts, vocab_size=400, chat=True)
    build_llama("tiny", seed=seed, vocab_size=len(tok)).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    return {"base": str(out / "base"), "prompts": str(out / "tasks.jsonl")}


def config(base: str, prompts: str, out: str, steps: int = 2, self_play: bool = False,
           runtime: str = "inprocess") -> dict:
    policy = {"reward": [], "algorithm": "grpo", "num_generations": 4, "lr": 1e-3, "lora": {"r": 8, "alpha": 16}}
    policies = [{"name": "both", **policy}] if self_play else [{"name": "proposer", **policy},
                                                               {"name": "solver", **policy}]
    players = ([{"role": r, "policy": "both"} for r in ("proposer", "solver")] if self_play else
               [{"role": r, "policy": r} for r in ("proposer", "solver")])
    return {
        "model": {"base": base},
        "policies": policies,
        "generation": {"max_new_tokens": 16, "min_new_tokens": 1, "stop_at_eos": True},
        "episodes": {"environment": f"{HERE}:ProposerSolver", "max_turns": 3, "max_tokens": 128,
                     "players": players},
        "ppo": {"steps": steps, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "rollout_logprobs": False},
        "cluster": {"runtime": runtime, "rollout_workers": 1, "num_hosts": 1, "host_num_cpus": 1},
        "data": {"prompts": prompts, "max_prompt_tokens": 64},
        "run": {"out_dir": out, "report_to": "none", "progress": False, "log_samples": 1},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base", default=None, help="a chat model; default: a tiny local one")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--self-play", action="store_true", help="one policy plays both roles")
    ap.add_argument("--runtime", choices=("ray", "inprocess"), default="inprocess")
    args = ap.parse_args(argv)
    from marl_ray.config import PPORunConfig, load_config
    from marl_ray.stages.ppo import run_ppo

    out = Path(args.out_dir)
    assets = make_assets(out / "assets")
    cfg = config(args.base or assets["base"], assets["prompts"], str(out / "run"), args.steps, args.self_play,
                 args.runtime)
    summary = run_ppo(load_config(PPORunConfig, base=cfg))
    print(json.dumps({p: {k: m[k] for k in sorted(m) if k.startswith(("episodes/", "rewards/env"))}
                      for p, m in summary["policies"].items()}, indent=1))


if __name__ == "__main__":
    main()
