"""The verifiable task of `marl-ray demo --task arithmetic`: problems, splits, the SFT corpus and the checker."""

import re

import pytest

from marl_ray.data import arithmetic as A


def test_problem_and_answer_texts_have_fixed_widths():
    assert A.prompt_of(7, 45) == "07+45=" and A.answer_of(7, 45) == "052"
    assert A.prompt_of(99, 99) == "99+99=" and A.answer_of(99, 99) == "198"
    assert A.answer_of(0, 0) == "000"


def test_splits_partition_every_problem_and_do_not_depend_on_seeds():
    train, held = A.problems("train"), A.problems("eval")
    assert len(train) + len(held) == (A.MAX_OPERAND + 1) ** 2 == len(A.problems())
    assert not set(train) & set(held)
    assert 0.15 < len(held) / len(A.problems()) < 0.25  # about EVAL_FRACTION
    with pytest.raises(ValueError, match="split"):
        A.problems("test")


def test_corpus_holds_train_problems_only_with_the_asked_noise():
    texts = A.corpus(4000, seed=3, noise=0.5)
    assert texts == A.corpus(4000, seed=3, noise=0.5)  # seeded
    assert texts != A.corpus(4000, seed=4, noise=0.5)
    held = set(map(A.prompt_of, *zip(*A.problems("eval"))))
    off = 0
    for t in texts:
        m = re.fullmatch(r"(\d\d)\+(\d\d)=(\d\d\d)", t)
        assert m, t
        a, b, c = int(m[1]), int(m[2]), int(m[3])
        assert f"{m[1]}+{m[2]}=" not in held
        assert abs(c - (a + b)) <= 1 and c >= 0
        off += c != a + b
    assert 0.45 < off / len(texts) < 0.55
    assert all(re.fullmatch(r"\d\d\+\d\d=(\d\d\d)", t) for t in A.corpus(50, noise=0.0))
    assert all(int(t[:2]) + int(t[3:5]) == int(t[6:]) for t in A.corpus(200, noise=0.0))
    with pytest.raises(ValueError, match="noise"):
        A.corpus(10, noise=1.5)


def test_prompt_rows_carry_the_answer_column_and_unique_draws_are_distinct():
    rows = A.prompt_rows(300, seed=1, split="eval", unique=True)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        a, b = int(r["prompt"][:2]), int(r["prompt"][3:5])
        assert A.split_of(a, b) == "eval" and r["answer"] == A.answer_of(a, b)
    with pytest.raises(ValueError, match="distinct"):
        A.prompt_rows(len(A.problems("eval")) + 1, split="eval", unique=True)


def test_exact_match_reads_the_leading_digits_only():
    completions = ["052", " 052", "052</s>", "052 and more", "52", "0521", "053", "", "x052"]
    answers = ["052"] * len(completions)
    assert A.exact_match(["07+45="] * len(completions), completions, answers) == \
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert A.accuracy(["052", "053"], ["052", "052"]) == 0.5
    with pytest.raises(ValueError, match="answers"):
        A.exact_match(["p"], ["052", "052"], ["052"])


def test_exact_match_loads_as_a_reward_function_by_its_config_name():
    from marl_ray.train.rewards import load_function

    fn = load_function("marl_ray.data.arithmetic:exact_match", "rewards[0].function")
    assert fn(prompts=["07+45="], completions=["052"], answer=["052"]) == [1.0]
