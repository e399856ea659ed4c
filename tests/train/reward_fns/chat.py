"""Reward functions for tests/train/test_conversational.py: they check what a reward function sees of a
conversational prompt (its messages, as TRL's GRPOTrainer passes them, and the row's other columns)."""


def conversation_with_topic(prompts, completions, topic, **kwargs):
    """1.0 where the prompt is the row's conversation (a system and a user message, the user's naming the
    row's `topic` column) and the completion one assistant message, else 0.0 (so a mean of 1.0 says every
    row arrived as it should)."""
    return [float([m["role"] for m in p] == ["system", "user"] and t in p[-1]["content"]
                  and len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str))
            for p, c, t in zip(prompts, completions, topic)]


def short(prompts, completions, **kwargs):
    """Fewer characters, more reward."""
    return [-len(c[0]["content"]) / 10 for c in completions]
