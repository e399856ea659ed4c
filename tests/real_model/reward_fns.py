"""TRL-style reward functions for the real-model tests: each completion is either a string (text data) or,
for conversational data, a list of messages whose first is the assistant's reply."""

from __future__ import annotations

import re


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    assert completion and completion[0]["role"] == "assistant", completion
    return completion[0]["content"]


def one_word(prompts, completions, category, **kwargs):
    """1.0 for a reply that is a single word (letters, an optional final period), else 0.0; each row must
    carry its `category` column."""
    assert len(category) == len(completions) and all(isinstance(c, str) for c in category)
    out = []
    for c in completions:
        text = _text(c)
        assert "<|im_end|>" not in text and "<|im_start|>" not in text, text  # special tokens left out
        out.append(1.0 if re.fullmatch(r"\s*[A-Za-z]+\.?\s*", text) else 0.0)
    return out
