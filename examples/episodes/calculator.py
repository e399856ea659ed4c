"""One policy, a calculator tool, several turns: TRL's environment_factory form, run by marl-ray episodes.

The environment (named ``examples/episodes/calculator.py:Calculator`` in a config) is reset from a data row
({prompt, a, b}); its public method ``add`` is a tool the chat template shows the model; a completion's
``<tool_call>{"name": "add", "arguments": {...}}</tool_call>`` runs it and the result comes back as a tool
message (context: never trained on). The reward: 1 when the last answer holds a + b, plus 0.5 when the tool
was called with the row's numbers.

    python examples/episodes/calculator.py OUT_DIR [--base PATH] [--steps N] [--runtime ray|inprocess]

Without --base it builds a tiny local base (random weights, a ChatML template that renders tools) so the
run goes end to end in seconds; with --base, a chat model whose template takes tools= (e.g. Qwen2.5 Instruct).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve()

# ChatML with tools (for the tiny base): the tools' schemas in a system turn, calls as <tool_call>{json}</tool_call>
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Calculator:
    def reset(self, **row):
        self.a, self.b = int(row["a"]), int(row["b"])
        self.called = False
        self.last = ""

    def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        self.called = self.called or (int(a), int(b)) == (self.a, self.b)
        return str(int(a) + int(b))

    def step(self, role, message):
        self.last = message["content"]

    def get_reward(self) -> float:
        numbers = re.findall(r"-?\d+", self.last)
        right = bool(numbers) and int(numbers[-1]) == self.a + self.b
        return float(right) + (0.5 if self.called else 0.0)


def make_assets(out: Path, n: int = 64, seed: int = 0) -> dict:
    """A tiny ChatML base whose template renders tools, and n addition problems as {prompt, a, b} rows."""
    from marl_ray.data.tiny import build_llama, build_tokenizer

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Use the add tool."}],
                     "a": a, "b": b})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"][0]["content"] for r in rows] + ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
                                                       '</tool_call>'] * 8
    tok = build_tokenizer(texts * 4, vocab_size=400, chat=True)
    tok.chat_template = TOOL_TEMPLATE
    tok.model_max_length = 512
    build_llama("tiny", seed=seed, vocab_size=len(tok), max_position_embeddings=512).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    return {"base": str(out / "base"), "prompts": str(out / "sums.jsonl")}


def config(base: str, prompts: str, out: str, steps: int = 2, runtime: str = "inprocess") -> dict:
    return {
        "model": {"base": base},
        "policies": [{"name": "calc", "reward": [], "algorithm": "grpo", "num_generations": 4, "lr": 1e-3,
                      "lora": {"r": 8, "alpha": 16}}],
        "generation": {"max_new_tokens": 48, "min_new_tokens": 1, "stop_at_eos": True},
        "episodes": {"environment": f"{HERE}:Calculator", "max_turns": 3, "max_tokens": 192},
        "ppo": {"steps": steps, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "rollout_logprobs": False},
        "cluster": {"runtime": runtime, "rollout_workers": 1, "num_hosts": 1, "host_num_cpus": 1},
        "data": {"prompts": prompts, "max_prompt_tokens": 384},
        "run": {"out_dir": out, "report_to": "none", "progress": False, "log_samples": 1},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base", default=None, help="a chat model whose template renders tools; default: a tiny local one")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runtime", choices=("ray", "inprocess"), default="inprocess")
    args = ap.parse_args(argv)
    from marl_ray.config import PPORunConfig, load_config
    from marl_ray.stages.ppo import run_ppo

    out = Path(args.out_dir)
    assets = make_assets(out / "assets")
    cfg = config(args.base or assets["base"], assets["prompts"], str(out / "run"), args.steps, args.runtime)
    summary = run_ppo(load_config(PPORunConfig, base=cfg))
    m = summary["policies"]["calc"]
    print(json.dumps({k: m[k] for k in sorted(m) if k.startswith(("episodes/", "rewards/env"))}, indent=1))


if __name__ == "__main__":
    main()
