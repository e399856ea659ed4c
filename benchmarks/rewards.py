"""The GRPO reference workload's programmatic reward (benchmarks/README.md, "The GRPO workload").

Standard library only, with TRL's reward-function signature, so that both sides call the very same
function: marl-ray loads it by path (`{name: vowels, function: "benchmarks/rewards.py:vowel_fraction"}`,
benchmarks/grpo_step.py) and TRL's GRPOTrainer takes it as `reward_funcs` (benchmarks/trl_grpo_peer.py).
"""

from __future__ import annotations

VOWELS = frozenset("aeiou")


def vowel_fraction(prompts, completions, **kwargs):
    """The fraction of vowels among each completion's letters (0.0 for a completion without letters).

    prompts, completions: lists of decoded strings, one entry per completion; other keyword columns
    are ignored. Returns one float per completion."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in VOWELS for ch in letters) / len(letters) if letters else 0.0)
    return out
