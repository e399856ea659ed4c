"""A generated verifiable chat task: answer with exactly one word, with an exact checker.

`marl-ray demo --task one-word` runs RL (GRPO, LoRA) on SmolLM2-135M-Instruct with the rule-based
reward `one_word` alone: asked "Name a fruit. Answer with exactly one word.", the instruct model
rambles ("The fruit I would suggest is ...": 0% greedy, about 10% sampled on held-out prompts), and
RL has to teach it to stop after the word.

* A question is ``{ask} {instruction}``: `ask` is one of QUESTIONS filled with a category of CATEGORIES
  ("Name a fruit.", "Which animal do you like most?"), `instruction` one of INSTRUCTIONS ("Answer with
  exactly one word."). A prompt row is ``{"messages": [{"role": "user", "content": question}],
  "category": ...}``, a conversation rendered with the model's chat template.
* Splits: `split_of(question)` puts a question in "train" or "eval" by a hash of its text alone (about
  EVAL_FRACTION of them are "eval"), so held-out questions are never RL prompts, whatever the seeds.
* `is_one_word(text)`: the reply, stripped of surrounding whitespace and of one final ".", "!" or "?",
  is a single word of letters (a hyphen or an apostrophe inside the word allowed: "blue-green", "o'clock").
* `one_word(prompts, completions, **columns)`: 1.0 per completion that `is_one_word`, else 0.0. A reward
  function in TRL's GRPOTrainer signature, importable as ``marl_ray.data.one_word:one_word``; a completion
  is a string (text data) or TRL's conversational form ``[{"role": "assistant", "content": TEXT}]``.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Sequence

CATEGORIES = ("fruit", "color", "animal", "country", "vegetable", "sport", "city", "flower", "bird", "drink",
              "planet", "tool", "vehicle", "musical instrument", "metal", "fish", "tree", "insect", "language",
              "dessert", "board game", "profession", "ocean", "month")
QUESTIONS = ("Name a {c}.", "What is your favorite {c}?", "Give me an example of a {c}.",
             "Which {c} do you like most?", "Tell me one {c}.", "Think of a {c}. Which one is it?")
INSTRUCTIONS = ("Answer with exactly one word.", "Reply with a single word.", "Respond with one word only.")
#: Fraction of the questions held out ("eval") by `split_of`.
EVAL_FRACTION = 0.25
SPLITS = ("train", "eval")
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")


def question_of(category: str, question: int, instruction: int) -> str:
    return f"{QUESTIONS[question].format(c=category)} {INSTRUCTIONS[instruction]}"


def split_of(question: str) -> str:
    """"train" or "eval": a fixed function of the question's text alone."""
    return "eval" if zlib.crc32(question.encode("utf-8")) % 1000 < EVAL_FRACTION * 1000 else "train"


def questions(split: str | None = None) -> list[tuple[str, str]]:
    """Every (question, category) of `split` ("train", "eval", or None for both), in a fixed order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    out = [(question_of(c, q, i), c) for c in CATEGORIES for q in range(len(QUESTIONS))
           for i in range(len(INSTRUCTIONS))]
    return [(t, c) for t, c in out if split is None or split_of(t) == split]


def prompt_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct chat prompt rows of `split` in a seeded order: {"messages": [user turn], "category"}."""
    pool = questions(split)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} distinct {split} questions; asked for {n}")
    rng = random.Random(f"marl_ray.one_word:{seed}:{split}")  # string seeds: stable across runs and platforms
    return [{"messages": [{"role": "user", "content": t}], "category": c} for t, c in rng.sample(pool, n)]


def is_one_word(text: str) -> bool:
    """The reply is exactly one word (see the module's docstring)."""
    s = text.strip()
    if s[-1:] in (".", "!", "?"):
        s = s[:-1]
    return bool(_WORD.fullmatch(s))


def completion_text(completion) -> str:
    """The reply's text: a string as given, or the content of the first message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[0], dict):
        return str(completion[0].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def one_word(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """Reward: 1.0 where the completion is exactly one word, else 0.0."""
    return [1.0 if is_one_word(completion_text(c)) else 0.0 for c in completions]
