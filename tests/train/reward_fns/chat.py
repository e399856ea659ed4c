"""Reward functions for tests/train/test_conversational.py: they check what a reward function sees of a
conversational prompt (the rendered chat, the row's other columns)."""


def rendered_with_topic(prompts, completions, topic, **kwargs):
    """1.0 where the prompt is the ChatML rendering ready for the assistant's turn and holds the row's
    `topic` column, else 0.0 (so a mean of 1.0 says every row arrived as it should)."""
    return [float(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") and t in p)
            for p, t in zip(prompts, topic)]


def short(prompts, completions, **kwargs):
    """Fewer characters, more reward."""
    return [-len(c) / 10 for c in completions]
