"""Example reward functions loaded by file path in tests/train/test_rewards.py ("reward_fns/tasks.py:NAME")."""

THRESHOLD = 0.5  # not callable


def exact_match(prompts, completions, answer, **kwargs):
    """1.0 where the completion equals the answer (after stripping), else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def length_or_none(prompts, completions, **kwargs):
    """Length of the completion, None (not applicable) for an empty one."""
    return [len(c) if c else None for c in completions]


def _private_helper():
    return None
