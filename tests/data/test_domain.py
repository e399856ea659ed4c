"""The generated review domain and its gold oracle (marl_ray.data.domain); pure Python, fast."""

import json
import math
import random
import statistics

import pytest

from marl_ray.data import domain as d


# --- oracle -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "the movie was good.",
    "a brilliant film, i loved it.",
    "the plot was not bad.",
    "it never felt dull.",
    "the plot was brilliant, but the ending was a bit slow.",
])
def test_oracle_positive(text):
    assert d.oracle_score(text) > 0


@pytest.mark.parametrize("text", [
    "the movie was bad.",
    "an awful film, i hated it.",
    "the plot was not good.",
    "i would not recommend it.",
    "the acting was fine, but the script was terrible and the pacing was slow.",
])
def test_oracle_negative(text):
    assert d.oracle_score(text) < 0


def test_oracle_weights_negation_and_intensifiers():
    good = d.oracle_score("it was good.")
    assert d.oracle_score("it was not good.") == pytest.approx(-good)
    assert d.oracle_score("it was brilliant.") > good  # weight 2 > weight 1
    assert d.oracle_score("it was very good.") > good
    assert d.oracle_score("it was not very good.") == pytest.approx(-d.oracle_score("it was very good."))
    assert d.oracle_score("it wasn't good.") < 0
    assert d.oracle_score("not not good") == pytest.approx(good)  # double negation cancels
    # Negation reaches only the next sentiment word and stops at a clause break.
    assert d.oracle_score("not good, good") == 0.0
    assert d.oracle_score("it was not good, but the music was great.") > 0
    assert d.oracle_score("not the plot, it was good.") == pytest.approx(good)
    assert d.oracle_score("it was good.") == pytest.approx(math.tanh(1 / d.ORACLE_SCALE))
    # Case and surrounding punctuation do not matter.
    assert d.oracle_score("IT WAS GOOD!") == pytest.approx(good)


@pytest.mark.parametrize("text", [
    "", "   ", "\n\t", "the movie with tom", "xq zzv 123 !!!", "goodgood badbad", "\x00\xff\u2603 \U0001F600",
    "<s></s><pad>", "ǵóód", "....,,,,",
])
def test_oracle_neutral_and_garbage_is_zero(text):
    assert d.oracle_score(text) == 0.0


def test_oracle_bounded_and_deterministic():
    rng = random.Random(0)
    words = list(d.LEXICON) + ["not", "very", ",", ".", "the", "but"]
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 60)))
        s = d.oracle_score(text)
        assert -1.0 <= s <= 1.0
        assert s == d.oracle_score(text)
    assert d.oracle_score(" ".join(["brilliant"] * 500)) <= 1.0
    assert d.oracle_score(" ".join(["awful"] * 500)) >= -1.0


def test_oracle_rejects_non_strings():
    with pytest.raises(TypeError):
        d.oracle_score(None)


def test_lexicon_shape():
    assert 45 <= len(d.POSITIVE) <= 60 and 45 <= len(d.NEGATIVE) <= 60
    assert all(w > 0 for w in d.POSITIVE.values()) and all(w < 0 for w in d.NEGATIVE.values())
    assert not set(d.POSITIVE) & set(d.NEGATIVE)
    neutral = set(d.ACTORS) | set(d.GENRES) | set(d.SUBJECTS) | set(d.ASPECTS) | set(d.RELATIONS)
    assert not neutral & (set(d.LEXICON) | d.NEGATORS | d.INTENSIFIERS)


# --- generator ----------------------------------------------------------------------------------

def test_corpus_deterministic_by_seed():
    assert d.corpus(50, seed=3) == d.corpus(50, seed=3)
    assert d.corpus(50, seed=3) != d.corpus(50, seed=4)
    assert d.corpus(10, seed=3) == d.corpus(50, seed=3)[:10]
    a, b = random.Random(7), random.Random(7)
    assert [d.generate_review(a) for _ in range(5)] == [d.generate_review(b) for _ in range(5)]


def test_texts_are_lowercase_ascii_single_spaced():
    for t in d.corpus(500, seed=1):
        assert t.isascii() and t == t.lower() and t == t.strip() and "  " not in t
        assert set(t) <= set("abcdefghijklmnopqrstuvwxyz .,")
        assert t.endswith(".")
        words = t.split()
        assert d.MIN_WORDS <= len(words) <= d.MAX_WORDS and len(t) <= d.MAX_CHARS
        # punctuation is attached to the word before it
        assert all(w.strip(".,") and w.rstrip(".,") == w.strip(".,") for w in words)


def test_corpus_oracle_spread():
    scores = [d.oracle_score(t) for t in d.corpus(2000)]
    pos = sum(s > 0 for s in scores) / len(scores)
    neg = sum(s < 0 for s in scores) / len(scores)
    assert pos > 0.3 and neg > 0.3
    assert abs(statistics.mean(scores)) < 0.1
    assert statistics.pstdev(scores) > 0.4
    assert sum(abs(s) > 0.8 for s in scores) > 0.1 * len(scores)  # clear reviews exist
    assert sum(0 < abs(s) < 0.5 for s in scores) > 0.1 * len(scores)  # and mixed / mild ones


def test_sentiment_argument_biases_reviews():
    rng = random.Random(0)
    hi = [d.oracle_score(d.generate_review(rng, 1.0)) for _ in range(200)]
    lo = [d.oracle_score(d.generate_review(rng, -1.0)) for _ in range(200)]
    assert statistics.mean(hi) > 0.6 and statistics.mean(lo) < -0.6
    assert statistics.mean(hi) > statistics.mean(lo)
    with pytest.raises(ValueError):
        d.generate_review(rng, 1.5)


def test_corpus_vocabulary_is_small():
    vocab = d.vocabulary(d.corpus(5000))
    assert 150 < len(vocab) < 600
    assert all(w.isalpha() for w in vocab)


# --- prompts and splits -------------------------------------------------------------------------

def test_prompts_short_neutral_and_deterministic():
    ps = d.prompts(500, seed=0)
    assert ps == d.prompts(500, seed=0)
    assert ps != d.prompts(500, seed=1)
    assert all(len(p.split()) == d.HEAD_WORDS for p in ps)
    scores = [d.oracle_score(p) for p in ps]
    assert abs(statistics.mean(scores)) < 0.1
    assert all(s == 0.0 for s in scores)
    assert len(set(ps)) > 100  # varied
    long = d.prompts(200, seed=0, n_words=6)
    assert all(len(p.split()) == 6 and d.oracle_score(p) == 0.0 for p in long)
    with pytest.raises(ValueError):
        d.prompts(1, n_words=0)
    with pytest.raises(ValueError):
        d.prompts(1, split="test")


def test_prompts_are_openings_of_the_corpus_language():
    heads = {" ".join(t.split()[:d.HEAD_WORDS]) for t in d.corpus(5000, seed=9)}
    # every opening is neutral by construction (prompts() filters nothing at the default length)
    assert not any(d.sentiment_words(h) or set(h.split()) & (d.NEGATORS | d.INTENSIFIERS) for h in heads)
    ps = d.prompts(300, seed=0, split=None)
    assert sum(p in heads for p in ps) > 0.8 * len(ps)


def test_train_and_eval_prompts_are_disjoint():
    train = set(d.prompts(2000, seed=0, split="train"))
    evals = set(d.prompts(500, seed=0, split="eval"))
    assert train and evals and not train & evals
    # ... for any seeds and lengths, since the split is a function of the head alone
    train6 = set(d.prompts(500, seed=5, split="train", n_words=6))
    assert not train6 & set(d.prompts(500, seed=11, split="eval", n_words=6))
    assert all(d.split_of(p) == "train" for p in train) and all(d.split_of(p) == "eval" for p in evals)
    assert d.split_of("i saw this film, and it was good.") == d.split_of("i saw this film")
    # pairs follow the same split
    assert not {r["prompt"] for r in d.preference_pairs(300, split="train")} & evals
    assert all(d.split_of(r["prompt"]) == "eval" for r in d.preference_pairs(50, split="eval"))


def test_split_fraction_and_eval_variety():
    heads = {" ".join(t.split()[:d.HEAD_WORDS]) for t in d.corpus(10000)}
    frac = sum(d.split_of(h) == "eval" for h in heads) / len(heads)
    assert 0.1 < frac < 0.3
    evals = d.prompts(1000, seed=0, split="eval")
    top = max(evals.count(p) for p in set(evals))
    assert len(set(evals)) > 50 and top < 0.1 * len(evals)  # no single opening dominates


def test_unique_prompts():
    ps = d.prompts(100, seed=2, split="eval", unique=True)
    assert len(set(ps)) == 100
    with pytest.raises(ValueError, match="distinct"):
        d.prompts(50, n_words=1, unique=True)


# --- preference pairs ---------------------------------------------------------------------------

def test_preference_pairs():
    pairs = d.preference_pairs(300, seed=0)
    assert pairs == d.preference_pairs(300, seed=0)
    assert len(pairs) == 300
    for r in pairs:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert len(r["prompt"].split()) == d.HEAD_WORDS
        for side in (r["chosen"], r["rejected"]):
            assert side.startswith(r["prompt"]) and side[len(r["prompt"])] in " ,."
        assert r["chosen"] != r["rejected"]
        assert d.oracle_score(r["chosen"]) > d.oracle_score(r["rejected"])
        assert d.oracle_score(r["prompt"]) == 0.0
    # chosen is not simply the longer one, and both sides contain positive and negative reviews
    assert 0.2 < sum(len(r["chosen"]) > len(r["rejected"]) for r in pairs) / len(pairs) < 0.8
    assert sum(d.oracle_score(r["rejected"]) > 0 for r in pairs) > 20
    assert sum(d.oracle_score(r["chosen"]) < 0 for r in pairs) > 20


# --- jsonl --------------------------------------------------------------------------------------

def test_jsonl_roundtrip(tmp_path):
    rows = d.preference_pairs(20)
    path = d.write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    assert d.read_jsonl(path) == rows
    assert d.read_jsonl(str(path), required=("prompt", "chosen", "rejected")) == rows


def test_read_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + '{"prompt": "b"\n' + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(ValueError) as e:
        d.read_jsonl(path)
    assert "bad.jsonl" in str(e.value) and "line 3" in str(e.value)


def test_read_jsonl_missing_key_names_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    d.write_jsonl([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], path)
    assert len(d.read_jsonl(path)) == 2  # nothing required
    with pytest.raises(ValueError) as e:
        d.read_jsonl(path, required=("prompt", "chosen", "rejected"))
    assert "rows.jsonl" in str(e.value) and "line 2" in str(e.value) and "rejected" in str(e.value)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1"):
        d.read_jsonl(path, required=("prompt",))
