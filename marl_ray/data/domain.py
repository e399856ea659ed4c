"""A generated movie-review domain with a hidden gold sentiment scorer (no downloads).

This plays the part IMDB plays in the classic RLHF sentiment demo, shrunk so that a Llama of
~0.2-2M parameters with a 512-token byte-level BPE learns it in minutes on a CPU:

* texts are 10-24 lowercase ASCII words, at most 110 characters (MIN_WORDS, MAX_WORDS,
  MAX_CHARS); '.' and ',' are attached to the word before them
  ("the plot was dull, but the cast was great.") and nothing else is punctuation;
* a few hundred distinct words (`vocabulary(corpus(...))` is ~230);
* every review opens with a 4-word neutral *head* ("the thriller with tom", "my sister and i"),
  optionally a neutral tail ("and anna", "last night"), then 2-3 clauses whose sentiment words
  are drawn from `LEXICON`, so after the opening a continuation can go either way.

`oracle_score` is the gold reward: a fixed lexicon sum, never shown to a learner. The learned
reward model sees only `preference_pairs` ranked by it; the pipeline measures progress with it.

Splits: `split_of(text)` assigns every text to "train" or "eval" by a hash of its first four
words (its head) alone, so train and eval prompts/pairs never share a head, whatever the seeds.
`corpus` (the SFT data) is unsplit: the held-out part is which openings RL and the reward model
see, not the language itself.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------------------------
# Lexicon

#: Positive sentiment words and their weights.
POSITIVE: dict[str, float] = {
    # adjectives, strong
    "brilliant": 2, "superb": 2, "wonderful": 2, "excellent": 2, "amazing": 2, "perfect": 2,
    "stunning": 2, "fantastic": 2,
    "great": 1.5, "beautiful": 1.5, "delightful": 1.5, "gorgeous": 1.5, "hilarious": 1.5,
    # adjectives, mild
    "good": 1, "nice": 1, "fun": 1, "funny": 1, "clever": 1, "charming": 1, "sweet": 1,
    "solid": 1, "smart": 1, "fresh": 1, "lovely": 1, "warm": 1, "moving": 1, "gripping": 1,
    "touching": 1, "exciting": 1, "enjoyable": 1, "memorable": 1, "powerful": 1, "witty": 1,
    "sharp": 1, "engaging": 1, "strong": 1, "cool": 1,
    # verbs
    "love": 2, "loved": 2, "adored": 2, "enjoy": 1, "enjoyed": 1, "like": 1, "liked": 1,
    "recommend": 1,
    # nouns
    "masterpiece": 2, "gem": 2, "triumph": 2, "joy": 1.5, "delight": 1.5, "treat": 1,
    # sentence adverbs
    "thankfully": 1, "happily": 1,
}

#: Negative sentiment words and their (negative) weights.
NEGATIVE: dict[str, float] = {
    # adjectives, strong
    "awful": -2, "terrible": -2, "horrible": -2, "dreadful": -2, "rotten": -2, "pathetic": -2,
    "painful": -1.5, "stupid": -1.5, "tedious": -1.5, "pointless": -1.5, "lifeless": -1.5,
    "lousy": -1.5,
    # adjectives, mild
    "bad": -1, "poor": -1, "weak": -1, "dull": -1, "boring": -1, "silly": -1, "bland": -1,
    "flat": -1, "slow": -1, "messy": -1, "clumsy": -1, "lazy": -1, "cheap": -1, "tired": -1,
    "predictable": -1, "forgettable": -1, "annoying": -1, "confusing": -1, "awkward": -1,
    "shallow": -1, "stale": -1, "ugly": -1, "wooden": -1, "hollow": -1, "sloppy": -1,
    # verbs
    "hate": -2, "hated": -2, "dislike": -1, "disliked": -1, "regret": -1.5, "regretted": -1.5,
    "avoid": -1,
    # nouns
    "disaster": -2, "waste": -2, "failure": -2, "mess": -1.5, "bore": -1.5, "letdown": -1.5,
    "chore": -1,
    # sentence adverbs
    "sadly": -1, "unfortunately": -1,
}

#: All sentiment words: word -> weight (positive > 0 > negative).
LEXICON: dict[str, float] = {**POSITIVE, **NEGATIVE}

#: Words that flip the sign of the next sentiment word in the same clause.
NEGATORS = frozenset({"not", "never", "no", "nor", "cannot", "hardly"})
#: Words that multiply the next sentiment word in the same clause by INTENSIFIER_FACTOR.
INTENSIFIERS = frozenset({"very", "really", "truly", "so", "quite"})
INTENSIFIER_FACTOR = 1.5
#: Tokens that end a negation/intensifier scope.
CLAUSE_BREAKS = frozenset({".", ",", ";", ":", "!", "?", "but", "and", "although", "though"})
#: oracle_score = tanh(raw / ORACLE_SCALE).
ORACLE_SCALE = 3.0

# Neutral vocabulary.
ACTORS = ("tom", "anna", "jack", "emma", "sam", "lucy", "max", "kate",
          "leo", "mia", "ben", "nina", "paul", "rose", "dan", "eva")
GENRES = ("movie", "film", "thriller", "comedy", "drama", "western", "musical", "romance",
          "mystery", "sequel", "remake", "cartoon", "fantasy")
# Consonant-initial, so "a <subject>" / "a <role>" never needs "an".
ROLES = ("robot", "spy", "detective", "king", "ghost", "pilot", "doctor", "teacher", "boxer",
         "singer", "witch", "thief", "farmer", "soldier", "nurse", "cowboy")
SUBJECTS = ROLES + ("family", "dog", "ship", "town")
ASPECTS = ("acting", "plot", "story", "script", "ending", "music", "cast", "pacing", "dialogue",
           "camera", "effects", "humor", "villain", "soundtrack", "editing", "finale")
RELATIONS = ("friend", "wife", "husband", "sister", "brother", "son", "daughter", "dad", "mom",
             "kids")
WATCHED = ("watched", "saw", "rented", "streamed", "caught")
WHEN = ("last night", "on sunday", "at home", "with my {relation}", "this weekend")

#: Length bounds of a review: words, and characters (which track BPE tokens better than words:
#: with a 512-token byte-level BPE trained on `corpus(2000)`, ~29 tokens on average, max ~50).
MIN_WORDS, MAX_WORDS, MAX_CHARS = 10, 24, 110
#: Number of words in every review's opening head (the default prompt length).
HEAD_WORDS = 4
#: Fraction of heads assigned to the "eval" split by `split_of`.
EVAL_FRACTION = 0.2
SPLITS = ("train", "eval")

# Parts of speech of the sentiment words, by sign and strength (strong: |weight| >= 1.5).
_ADJ_POS_STRONG = ("brilliant", "superb", "wonderful", "excellent", "amazing", "perfect",
                   "stunning", "fantastic", "great", "beautiful", "delightful", "gorgeous",
                   "hilarious")
_ADJ_POS_MILD = ("good", "nice", "fun", "funny", "clever", "charming", "sweet", "solid",
                 "smart", "fresh", "lovely", "warm", "moving", "gripping", "touching", "exciting",
                 "enjoyable", "memorable", "powerful", "witty", "sharp", "engaging", "strong",
                 "cool")
_ADJ_NEG_STRONG = ("awful", "terrible", "horrible", "dreadful", "rotten", "pathetic", "painful",
                   "stupid", "tedious", "pointless", "lifeless", "lousy")
_ADJ_NEG_MILD = ("bad", "poor", "weak", "dull", "boring", "silly", "bland", "flat", "slow",
                 "messy", "clumsy", "lazy", "cheap", "tired", "predictable", "forgettable",
                 "annoying", "confusing", "awkward", "shallow", "stale", "ugly", "wooden",
                 "hollow", "sloppy")
_ADJ = {(1, True): _ADJ_POS_STRONG, (1, False): _ADJ_POS_MILD,
        (-1, True): _ADJ_NEG_STRONG, (-1, False): _ADJ_NEG_MILD}
_VERB_PAST = {(1, True): ("loved", "adored"), (1, False): ("enjoyed", "liked"),
              (-1, True): ("hated", "regretted"), (-1, False): ("disliked",)}
_VERB_BASE = {1: ("love", "enjoy", "like"), -1: ("hate", "dislike", "regret")}
_NOUN = {(1, True): ("masterpiece", "gem", "triumph", "joy", "delight"), (1, False): ("treat",),
         (-1, True): ("disaster", "waste", "failure", "mess", "bore", "letdown"),
         (-1, False): ("chore",)}
_ADVERB = {1: ("thankfully", "happily"), -1: ("sadly", "unfortunately")}
_RECOMMEND = {1: "recommend", -1: "avoid"}

# Opening heads: (weight, kind, head template, tail templates). Every head is HEAD_WORDS words,
# every head and tail is free of sentiment words. kind "np": the opening is a noun phrase and
# the body continues with a predicate ("... was great"); kind "clause": a whole clause. Most
# heads have many fillings, so no single opening dominates a split.
_HEADS = (
    (3, "np", "the {genre} with {actor}", ("", "", "and {actor}")),
    (2, "np", "the {genre} starring {actor}", ("", "", "and {actor}")),
    (1, "np", "this {genre} about a", ("{subject}", "young {role}")),
    (1, "np", "the {genre} about the", ("{subject}", "old {role}")),
    (1, "np", "the new {genre} from", ("{actor}",)),
    (2, "clause", "{actor} and {actor} star", ("in this {genre}", "in the {genre}",
                                              "in the new {genre}")),
    (1, "clause", "{actor} stars as a", ("{role} in this {genre}", "{role} in the new {genre}")),
    (2, "clause", "{actor} plays the {role}", ("in this {genre}", "in the {genre}",
                                               "in the new {genre}")),
    (2, "clause", "i {watched} this {genre}", ("", "{when}")),
    (2, "clause", "we {watched} the {genre}", ("", "{when}", "with {actor}")),
    (2, "clause", "my {relation} and i", ("{watched} this {genre}", "{watched} the {genre}",
                                          "{watched} the new {genre}")),
    (0.5, "clause", "last night i {watched}", ("the {genre}", "this {genre}",
                                               "the {genre} with {actor}")),
)
_HEAD_WEIGHTS = tuple(h[0] for h in _HEADS)

_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?]")


# ---------------------------------------------------------------------------------------------
# Oracle

def _raw_score(text: str) -> tuple[float, int]:
    """(sum of signed, negated, intensified lexicon weights, number of sentiment words)."""
    total, hits = 0.0, 0
    negate, factor = False, 1.0
    for tok in _TOKEN_RE.findall(text.lower()):
        if tok in CLAUSE_BREAKS:
            negate, factor = False, 1.0
        elif tok in NEGATORS or tok.endswith("n't"):
            negate = not negate
        elif tok in INTENSIFIERS:
            factor = INTENSIFIER_FACTOR
        elif tok in LEXICON:
            w = LEXICON[tok] * factor
            total += -w if negate else w
            hits += 1
            negate, factor = False, 1.0
    return total, hits


def oracle_score(text: str) -> float:
    """Gold sentiment of `text` in [-1, 1]; deterministic, never seen by a learner.

    The text is lowercased and split into words (``[a-z]+``, optionally with an apostrophe
    part such as "didn't") and the punctuation marks ``.,;:!?``; everything else is ignored.
    Walking left to right, each word of `LEXICON` adds its weight (+2 "brilliant", +1 "good",
    -1 "dull", -2 "awful", ...) to a raw sum, where

    * a negator (`NEGATORS`, or any word ending in "n't") flips the sign of the next sentiment
      word ("not good" = -1, "never felt dull" = +1; two negators cancel);
    * an intensifier (`INTENSIFIERS`) multiplies the next sentiment word by 1.5
      ("very good" = +1.5, "not very good" = -1.5);
    * both reach only up to that sentiment word and are cleared by a clause break
      (`CLAUSE_BREAKS`: punctuation, "but", "and", ...).

    The score is ``tanh(raw / 3)``: one mild word gives +-0.32, a clearly positive review with
    a few words ~+0.9. Text with no sentiment words (empty, garbage, non-English) scores 0.0.
    Repeating a word adds its weight again: the oracle measures lexical sentiment, not quality.
    """
    if not isinstance(text, str):
        raise TypeError(f"oracle_score expects a str, got {type(text).__name__}")
    raw, _ = _raw_score(text)
    return float(math.tanh(raw / ORACLE_SCALE)) if raw else 0.0


def sentiment_words(text: str) -> list[str]:
    """The lexicon words occurring in `text`, in order (what the oracle counts)."""
    return [t for t in _TOKEN_RE.findall(text.lower()) if t in LEXICON]


# ---------------------------------------------------------------------------------------------
# Generator

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fill(rng: random.Random, template: str) -> str:
    """Replace each {slot} in `template` with a neutral word drawn from `rng`, left to right."""
    pools = {"genre": GENRES, "actor": ACTORS, "subject": SUBJECTS, "role": ROLES,
             "relation": RELATIONS, "watched": WATCHED, "aspect": ASPECTS}
    out = []
    for part in re.split(r"(\{[a-z]+\})", template):
        if part.startswith("{"):
            slot = part[1:-1]
            if slot == "when":
                out.append(_fill(rng, rng.choice(WHEN)))
            else:  # never the same word twice in one template ("tom and tom")
                out.append(rng.choice([w for w in pools[slot] if w not in out]))
        else:
            out.append(part)
    return "".join(out)


def _draw_head(rng: random.Random) -> tuple[int, str]:
    index = rng.choices(range(len(_HEADS)), weights=_HEAD_WEIGHTS)[0]
    return index, _fill(rng, _HEADS[index][2])


def _adj_phrase(rng: random.Random, pol: int, strong: bool, negate: bool = True) -> str:
    """A predicate adjective expressing `pol`: 'clever', 'very clever', 'not boring'."""
    r = rng.random()
    if r < 0.15 and negate:  # negated opposite (mild words only: "not bad", "not funny")
        return "not " + rng.choice(_ADJ[(-pol, False)])
    if r < 0.3 and not strong:
        return rng.choice(("very", "really", "quite")) + " " + rng.choice(_ADJ[(pol, False)])
    return rng.choice(_ADJ[(pol, strong)])


def _predicate(rng: random.Random, pol: int, strong: bool) -> str:
    """A verb phrase following a noun-phrase subject."""
    r = rng.random()
    if r < 0.5:
        return "was " + _adj_phrase(rng, pol, strong)
    if r < 0.65:
        return "felt " + _adj_phrase(rng, pol, strong, negate=False)
    if r < 0.75:
        return "never felt " + rng.choice(_ADJ[(-pol, False)])
    if r < 0.9:
        noun = rng.choice(_NOUN[(pol, strong)])
        return f"was {_article(noun)} {noun}"
    adj = rng.choice(_ADJ[(pol, strong)])
    return f"was {_article(adj)} {adj} watch"


def _clause(rng: random.Random, pol: int, strong: bool) -> str:
    """A full clause with sentiment `pol` (+1/-1) or a neutral one (pol 0)."""
    if pol == 0:
        return _fill(rng, rng.choice((
            "it is about a {subject}", "{actor} plays a {subject}", "i saw it with my {relation}",
            "it runs two hours", "the music is by {actor}", "it has a {subject} in it")))
    r = rng.random()
    if r < 0.3:
        return f"the {rng.choice(ASPECTS)} {_predicate(rng, pol, strong)}"
    if r < 0.45:
        return f"it {_predicate(rng, pol, strong)}"
    if r < 0.57:
        return f"{rng.choice(ACTORS)} was {_adj_phrase(rng, pol, strong)} as the {rng.choice(ROLES)}"
    if r < 0.7:
        x = rng.random()
        if x < 0.2:
            return f"i did not {rng.choice(_VERB_BASE[-pol])} it"
        if x < 0.4:
            return f"i really {rng.choice(_VERB_PAST[(pol, strong)])} it"
        return f"i {rng.choice(_VERB_PAST[(pol, strong)])} it"
    if r < 0.78:
        if rng.random() < 0.2:
            return f"i would not {_RECOMMEND[-pol]} it"
        return f"i would {_RECOMMEND[pol]} it"
    if r < 0.86:
        return f"what {_article(n := rng.choice(_NOUN[(pol, strong)]))} {n}"
    if r < 0.93:
        return f"{rng.choice(_ADVERB[pol])}, the {rng.choice(ASPECTS)} was {_adj_phrase(rng, pol, strong)}"
    adj = rng.choice(_ADJ[(pol, strong)])
    return f"overall, {_article(adj)} {adj} {rng.choice(GENRES)}"


def _polarity(rng: random.Random, sentiment: float) -> tuple[int, bool]:
    pol = 1 if rng.random() < (1 + sentiment) / 2 else -1
    return pol, rng.random() < abs(sentiment)


def _continuation(rng: random.Random, head_index: int, sentiment: float) -> str:
    """Everything after the head: a neutral tail, then 2-3 sentiment (or neutral) clauses."""
    _, kind, _, tails = _HEADS[head_index]
    tail = _fill(rng, rng.choice(tails))
    n_clauses = rng.choice((2, 2, 3))
    parts: list[str] = []
    prev_pol = None
    for i in range(n_clauses):
        neutral = i > 0 and rng.random() < 0.12
        pol, strong = (0, False) if neutral else _polarity(rng, sentiment)
        if i == 0 and kind == "np":
            parts.append(_predicate(rng, pol, strong))
        else:
            clause = _clause(rng, pol, strong)
            if "," in clause:  # "sadly, ..." / "overall, ..." start a sentence
                parts.append(". " + clause)
            elif pol and prev_pol and pol != prev_pol and rng.random() < 0.7:
                parts.append(", but " + clause)
            else:
                parts.append(rng.choice((", and ", ". ")) + clause)
        if pol:
            prev_pol = pol
    body = "".join(parts)
    if kind == "np":
        body = " " + body
    return (" " + tail if tail else "") + body + "."


def _review(rng: random.Random, head_index: int, head: str, sentiment: float) -> str:
    """`head` plus a continuation, redrawn until within MIN_WORDS..MAX_WORDS and MAX_CHARS."""
    while True:
        text = head + _continuation(rng, head_index, sentiment)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS and len(text) <= MAX_CHARS:
            return text


def generate_review(rng: random.Random, sentiment: float | None = None) -> str:
    """One review, drawn with `rng`.

    `sentiment` in [-1, 1] biases each clause: it is positive with probability (1 + s) / 2
    and uses a strong word with probability |s|; None draws s uniformly from [-1, 1]. Reviews
    near s = 0 come out mixed ("the plot was clever, but the ending was dull.").
    """
    if sentiment is None:
        sentiment = rng.uniform(-1.0, 1.0)
    if not -1.0 <= sentiment <= 1.0:
        raise ValueError(f"sentiment must be in [-1, 1], got {sentiment}")
    index, head = _draw_head(rng)
    return _review(rng, index, head, sentiment)


def _rng(seed: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs/platforms.
    return random.Random(f"marl_ray.domain:{seed}:{purpose}")


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` reviews (the SFT corpus), deterministic for `seed`; unsplit (train and eval heads)."""
    rng = _rng(seed, "corpus")
    return [generate_review(rng) for _ in range(n)]


def split_of(text: str) -> str:
    """"train" or "eval": a fixed function of the first HEAD_WORDS words of `text` alone
    (with attached '.' and ',' removed, so "i saw this film," goes with "i saw this film").

    About EVAL_FRACTION of the heads are "eval". As the split depends on nothing else, the same
    string (and any two texts with the same head) always land in the same split, so train and
    eval prompts and pairs are disjoint for any seeds.
    """
    key = " ".join(w.strip(".,") for w in text.split()[:HEAD_WORDS])
    return "eval" if zlib.crc32(key.encode("utf-8")) % 1000 < EVAL_FRACTION * 1000 else "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def prompts(n: int, seed: int = 0, n_words: int = HEAD_WORDS, split: str | None = "train",
            unique: bool = False) -> list[str]:
    """`n` review openings: the first `n_words` words of generated reviews.

    Only openings without any sentiment word are kept (with n_words <= HEAD_WORDS that is every
    one), so a prompt's oracle score is 0 and the continuation decides the sentiment.
    `split` ("train", "eval", or None for both) keeps only openings with `split_of(...) ==
    split`; each split draws from its own seed derived from `seed`. Openings are drawn as often
    as they occur, so repeats happen; `unique=True` returns distinct strings (and raises
    ValueError when fewer than `n` exist).
    """
    _check_split(split)
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    rng = _rng(seed, f"prompts:{split}")
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"only {len(out)} {'distinct ' if unique else ''}prompts of "
                             f"{n_words} words found for split={split!r}; asked for {n}")
        words = generate_review(rng).split()
        if len(words) < n_words:
            continue
        prompt = " ".join(words[:n_words])
        if (split is not None and split_of(prompt) != split) or sentiment_words(prompt):
            continue
        if unique:
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append(prompt)
    return out


def preference_pairs(n: int, seed: int = 0, split: str | None = "train") -> list[dict]:
    """`n` oracle-ranked pairs ``{"prompt", "chosen", "rejected"}`` for reward-model training.

    Each pair shares a HEAD_WORDS-word opening (the `prompt`, like `prompts()`'s default);
    `chosen` and `rejected` are two full reviews starting with it (followed by a space, or by
    ',' or '.' when the head is a whole clause) whose continuations were
    drawn independently (each with a uniform random sentiment), and
    ``oracle_score(chosen) > oracle_score(rejected)`` strictly (ties are redrawn). `split`
    works as in `prompts`.
    """
    _check_split(split)
    rng = _rng(seed, f"pairs:{split}")
    out: list[dict] = []
    while len(out) < n:
        index, head = _draw_head(rng)
        if split is not None and split_of(head) != split:
            continue
        a = _review(rng, index, head, rng.uniform(-1.0, 1.0))
        b = _review(rng, index, head, rng.uniform(-1.0, 1.0))
        sa, sb = oracle_score(a), oracle_score(b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        out.append({"prompt": head, "chosen": chosen, "rejected": rejected})
    return out


def vocabulary(texts: Iterable[str]) -> set[str]:
    """Distinct words of `texts` (split on spaces, with attached '.' and ',' removed)."""
    return {w.strip(".,") for t in texts for w in t.split()} - {""}


# ---------------------------------------------------------------------------------------------
# JSONL

def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """Read a JSONL file; blank lines are skipped.

    Raises ValueError naming the file and the 1-based line number when a line is not valid
    JSON, or, when `required` keys are given, is not an object or lacks one of them.
    """
    path = Path(path)
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if required:
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object, "
                                     f"got {type(row).__name__}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ValueError(f"{path}: line {lineno}: missing required key(s) "
                                     f"{', '.join(map(repr, missing))}")
            rows.append(row)
    return rows


__all__ = [
    "POSITIVE", "NEGATIVE", "LEXICON", "NEGATORS", "INTENSIFIERS", "INTENSIFIER_FACTOR",
    "CLAUSE_BREAKS", "ORACLE_SCALE", "ACTORS", "GENRES", "SUBJECTS", "ASPECTS", "RELATIONS",
    "ROLES", "WATCHED", "MIN_WORDS", "MAX_WORDS", "MAX_CHARS", "HEAD_WORDS", "EVAL_FRACTION", "SPLITS",
    "oracle_score", "sentiment_words", "generate_review", "corpus", "split_of", "prompts",
    "preference_pairs", "vocabulary", "write_jsonl", "read_jsonl",
]
