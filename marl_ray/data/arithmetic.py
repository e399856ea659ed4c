"""A generated verifiable task: two-digit addition ("07+45=" -> "052") with an exact checker.

`marl-ray demo --task arithmetic` trains a tiny SFT base on it, then RL with the rule-based reward
`exact_match` alone (no reward model) on the one base.

* A problem is ``aa+bb=`` with a, b in 0..MAX_OPERAND, both zero-padded to two digits; its answer is
  the sum zero-padded to three digits (``07+45=`` -> ``052``). The demo's tokenizer has no merges,
  so every digit is one token and an answer is three digit tokens, then EOS. (Fixed widths keep the
  digits of a place at fixed positions: without padding the tiny model reached 10% exact match in
  the same SFT steps, with it about 60%.)
* Splits: `split_of(a, b)` puts a problem in "train" or "eval" by a hash of its text alone (about
  EVAL_FRACTION of the 10,000 problems are "eval"), so held-out problems are never in the SFT corpus
  nor among the RL prompts, whatever the seeds.
* `corpus(n, seed, noise)`: SFT texts ``aa+bb=ccc`` of train problems, where a fraction `noise` of
  the answers is off by one (the sum plus or minus one). The demo uses noise 0.5: its base learns
  the sum *and* the noise, so about half of what it samples is off by one while its most likely
  answer is right; RL with the exact-match reward alone removes the noise.
* `exact_match(prompts, completions, answer)`: 1.0 where the completion's leading digits (up to its
  first non-digit, after leading spaces) are exactly the answer, else 0.0. A reward function in
  TRL's GRPOTrainer signature, importable as ``marl_ray.data.arithmetic:exact_match``.
"""

from __future__ import annotations

import random
import zlib
from typing import Sequence

#: Operands are drawn from 0..MAX_OPERAND.
MAX_OPERAND = 99
#: Fraction of problems held out ("eval") by `split_of`.
EVAL_FRACTION = 0.2
SPLITS = ("train", "eval")


def _rng(seed: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"marl_ray.arithmetic:{seed}:{purpose}")


def prompt_of(a: int, b: int) -> str:
    """The problem text, operands zero-padded to two digits: prompt_of(7, 45) == "07+45="."""
    return f"{a:02d}+{b:02d}="


def answer_of(a: int, b: int) -> str:
    """The answer text, the sum zero-padded to three digits: answer_of(7, 45) == "052"."""
    return f"{a + b:03d}"


def split_of(a: int, b: int) -> str:
    """"train" or "eval": a fixed function of the problem's text alone."""
    return "eval" if zlib.crc32(prompt_of(a, b).encode("ascii")) % 1000 < EVAL_FRACTION * 1000 else "train"


def problems(split: str | None = None) -> list[tuple[int, int]]:
    """Every (a, b) of `split` ("train", "eval", or None for both), in order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    r = range(MAX_OPERAND + 1)
    return [(a, b) for a in r for b in r if split is None or split_of(a, b) == split]


def _draw(rng: random.Random, split: str | None, n: int, unique: bool) -> list[tuple[int, int]]:
    pool = problems(split)
    if unique:
        if n > len(pool):
            raise ValueError(f"only {len(pool)} distinct {split} problems; asked for {n}")
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


def corpus(n: int, seed: int = 0, noise: float = 0.0) -> list[str]:
    """`n` SFT texts "aa+bb=ccc" of train problems (drawn with repetition). A fraction `noise` of them
    (each independently) has the sum plus or minus one (never below 0) as its answer."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rng = _rng(seed, "corpus")
    out = []
    for a, b in _draw(rng, "train", n, unique=False):
        c = a + b
        if noise and rng.random() < noise:
            c = c + 1 if c == 0 or rng.random() < 0.5 else c - 1
        out.append(f"{prompt_of(a, b)}{c:03d}")
    return out


def prompt_rows(n: int, seed: int = 0, split: str = "train", unique: bool = False) -> list[dict]:
    """`n` rows {"prompt": "aa+bb=", "answer": "ccc"} of `split`: the RL prompt file (split "train"),
    or held-out problems (split "eval"); unique=True draws distinct problems."""
    rng = _rng(seed, f"prompts:{split}")
    return [{"prompt": prompt_of(a, b), "answer": answer_of(a, b)} for a, b in _draw(rng, split, n, unique)]


def parse_answer(completion: str) -> str:
    """The completion's leading digits (after leading whitespace), up to its first non-digit."""
    text = completion.lstrip()
    end = 0
    while end < len(text) and text[end] in "0123456789":
        end += 1
    return text[:end]


def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **kwargs) -> list[float]:
    """1.0 where `parse_answer(completion)` is exactly the row's `answer`, else 0.0.

    A reward function as TRL's GRPOTrainer calls them, fn(prompts, completions, **columns); `answer`
    is the prompt file's column. "052" is right for "07+45="; "52", "0521" and "053" are not."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [float(parse_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


def accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean `exact_match` of `completions` against `answers`."""
    scores = exact_match([""] * len(completions), completions, answers)
    return sum(scores) / max(len(scores), 1)


def sampled_accuracy(base, adapter, rows: Sequence[dict], samples: int = 4, seed: int = 0,
                     max_new_tokens: int = 4) -> float:
    """Held-out exact-match accuracy of a saved model, measured the way a user would, apart from the
    training code: plain transformers (+ peft for `adapter`, a saved policy folder) and `generate`,
    `samples` completions per problem at temperature 1 (no top-k / top-p), prompts encoded as the
    rollout workers encode them (the tokenizer's special tokens added)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    texts = [r["prompt"] for r in rows]
    enc = [tok(t)["input_ids"] for t in texts]
    if len({len(e) for e in enc}) != 1:
        raise ValueError("every problem must encode to the same number of tokens (no padding)")
    ids = torch.tensor(enc).repeat(samples, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
    completions = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return accuracy(completions, [r["answer"] for r in rows] * samples)


__all__ = ["MAX_OPERAND", "EVAL_FRACTION", "SPLITS", "prompt_of", "answer_of", "split_of", "problems", "corpus",
           "prompt_rows", "parse_answer", "exact_match", "accuracy", "sampled_accuracy"]
