"""Cheap programmatic rewards for the algorithm tests (tests/train/test_critic_free.py), loaded by path."""

STEPS = {"calls": 0}


def vowel_fraction(prompts, completions, **kwargs):
    """The fraction of vowels among a completion's letters (the reference GRPO workload's reward)."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


def mentions_answer(prompts, completions, answer):
    """1.0 where the completion contains the row's `answer` column, else 0.0; None for an empty answer."""
    return [None if not a else float(a in c) for c, a in zip(completions, answer)]


def explodes(prompts, completions, **kwargs):
    """Raises on its second call: a reward function that fails mid-run."""
    STEPS["calls"] += 1
    if STEPS["calls"] >= 2:
        raise RuntimeError("the grader's server went away")
    return [0.0] * len(completions)
