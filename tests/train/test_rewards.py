"""Tests for marl_ray.train.rewards: loading reward functions, calling them safely, combining rewards.

Numbers in the ``combine`` tests are derived by hand (see the comments) and cross-checked against numpy's
nan-aware reductions, which is what TRL 1.16's GRPOTrainer computes with torch.
"""

import asyncio
import math
import pickle
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from marl_ray.config import ConfigError
from marl_ray.train.rewards import (
    RewardFunction, RewardFunctionError, check_function, combine, load_function, nanstd,
)

HERE = Path(__file__).parent
FIELD = "rewards[1].function"
MOD = __name__  # this module, importable under this name while the tests run


# ------------------------------------------------------------------ reward functions used by the tests


def exact_match(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def by_name_only(prompts, completions, answer):  # no **kwargs: gets only the columns it names
    return [float(c == a) for c, a in zip(completions, answer)]


def with_default(prompts, completions, bonus=None):  # an optional column
    return [len(c) + (bonus[i] if bonus else 0.0) for i, c in enumerate(completions)]


def echo_kwargs(prompts, completions, **kwargs):
    echo_kwargs.seen = dict(kwargs)
    return [1.0] * len(completions)


def completions_only(completions, **kwargs):  # TRL's docs' shape: prompts goes into **kwargs
    return [float(len(c)) for c in completions]


def keyword_only(*, prompts, completions):
    return [0.0 for _ in completions]


async def async_len(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


async def async_boom(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    raise KeyError("server said no")


def returns(value):
    """A reward function returning ``value`` whatever it is given."""
    def fn(prompts, completions, **kwargs):
        return value
    return fn


def boom(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]


def two_args(x, y):
    return [0.0]


def no_prompts(completions, answer):
    return [0.0]


def positional_only(prompts, completions, /):
    return [0.0]


def needs_trainer_state(prompts, completions, trainer_state):
    return [0.0]


def needs_log_metric(prompts, completions, log_metric):
    return [0.0]


class Scorer:
    def __call__(self, prompts, completions, **kwargs):
        return [0.5] * len(completions)

    @staticmethod
    def score(prompts, completions, **kwargs):
        return [0.25] * len(completions)


scorer = Scorer()
NOT_A_FUNCTION = 3.5

P4 = ["p0", "p1", "p2", "p3"]
C4 = ["4", "5", "x", ""]
COLS = {"answer": ["4", "6", "x", "1"], "id": [0, 1, 2, 3]}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _config_error(spec, base_dir=None):
    with pytest.raises(ConfigError) as info:
        load_function(spec, FIELD, base_dir)
    msg = str(info.value)
    assert msg.startswith(FIELD + ": "), msg
    return msg


def _call_error(rf, out_columns=COLS, completions=C4):
    with pytest.raises(RewardFunctionError) as info:
        rf(P4[: len(completions)], completions, out_columns)
    msg = str(info.value)
    assert msg.startswith(f"reward function {rf.name!r} ({rf.spec})"), msg
    assert info.value.name == rf.name and info.value.spec == rf.spec
    return msg


# ------------------------------------------------------------------------------------------- loading


def test_load_from_module_spec():
    assert load_function(f"{MOD}:exact_match", FIELD) is exact_match
    assert load_function(f" {MOD}:exact_match ", FIELD) is exact_match  # surrounding spaces
    assert load_function(f"{MOD}:Scorer.score", FIELD) is Scorer.score  # dotted attribute
    assert load_function(f"{MOD}:scorer", FIELD) is scorer  # a callable object


def test_load_from_file_relative_to_base_dir_and_cwd(tmp_path, monkeypatch):
    fn = load_function("reward_fns/tasks.py:exact_match", FIELD, base_dir=HERE)
    assert fn(["q"], ["4 "], answer=["4"]) == [1.0]
    _write(tmp_path, "task.py", """
        def exact(prompts, completions, answer, **kwargs):
            return [float(c == a) for c, a in zip(completions, answer)]
    """)
    monkeypatch.chdir(tmp_path)
    by_cwd = load_function("task.py:exact", FIELD)
    by_abs = load_function(f"{tmp_path / 'task.py'}:exact", FIELD, base_dir=HERE)  # absolute ignores base_dir
    assert by_cwd(["q"], ["a"], answer=["a"]) == by_abs(["q"], ["a"], answer=["a"]) == [1.0]
    # each load gets its own unique module, registered so classes/dataclasses in the file work
    assert by_cwd.__module__ != by_abs.__module__
    assert by_cwd.__module__.startswith("_marl_ray_reward_") and by_cwd.__module__ in sys.modules


def test_file_with_dataclass_loads(tmp_path):
    _write(tmp_path, "dc.py", """
        from dataclasses import dataclass

        @dataclass
        class Cfg:
            target: str = "ok"

        def fn(prompts, completions, **kwargs):
            return [float(c == Cfg().target) for c in completions]
    """)
    assert load_function(f"{tmp_path}/dc.py:fn", FIELD)(prompts=["p"], completions=["ok"]) == [1.0]


@pytest.mark.parametrize("fn_name", ["exact_match", "by_name_only", "with_default", "echo_kwargs",
                                     "completions_only", "keyword_only", "async_len", "scorer"])
def test_accepted_signatures(fn_name):
    assert callable(load_function(f"{MOD}:{fn_name}", FIELD))


@pytest.mark.parametrize("spec, expect", [
    ("my_pkg.tasks.exact_match", "has no ':'"),
    (":exact_match", "has no module or file"),
    (f"{MOD}:", "has no function name"),
    (f"{MOD}:  ", "has no function name"),
])
def test_malformed_spec(spec, expect):
    assert expect in _config_error(spec)


def test_spec_not_a_string():
    assert "got NoneType None" in _config_error(None)


def test_missing_file_names_the_path(tmp_path):
    msg = _config_error("nope/task.py:fn", base_dir=tmp_path)
    assert "'nope/task.py' not found" in msg and str((tmp_path / "nope" / "task.py").resolve()) in msg
    assert f"relative to {tmp_path}" in msg


def test_not_a_python_file_or_a_folder(tmp_path):
    _write(tmp_path, "task.txt", "x = 1\n")
    assert "not a Python file" in _config_error("./task.txt:fn", base_dir=tmp_path)
    (tmp_path / "pkg.py").mkdir()
    assert "is not a file" in _config_error("pkg.py:fn", base_dir=tmp_path)


def test_import_error_in_file_is_reported(tmp_path):
    _write(tmp_path, "dep.py", "import no_such_dependency_xyz\n\ndef fn(prompts, completions): return []\n")
    msg = _config_error("dep.py:fn", base_dir=tmp_path)
    assert "ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in msg and "dep.py:1" in msg


def test_syntax_error_names_the_line(tmp_path):
    _write(tmp_path, "bad.py", """
        def fn(prompts, completions, **kwargs):
            return [1.0 for c in completions
    """)
    msg = _config_error("bad.py:fn", base_dir=tmp_path)
    assert f"cannot import {tmp_path / 'bad.py'}: SyntaxError at line 3: " in msg, msg
    assert "return [1.0 for c in completions" in msg
    assert not any(m.endswith("_bad") for m in sys.modules if m.startswith("_marl_ray_reward_"))  # not left behind


def test_exception_while_importing_file(tmp_path):
    _write(tmp_path, "raises.py", "x = 1\nraise ValueError('bad setup')\n")
    msg = _config_error("raises.py:fn", base_dir=tmp_path)
    assert "ValueError: bad setup" in msg and "raises.py:2" in msg


def test_module_not_found():
    msg = _config_error("no_such_pkg_xyz.tasks:fn")
    assert "no module named 'no_such_pkg_xyz'" in msg and "PYTHONPATH" in msg


def test_missing_attribute_lists_the_functions():
    msg = _config_error("reward_fns/tasks.py:exact_mach", base_dir=HERE)
    assert "has no 'exact_mach'" in msg and "did you mean 'exact_match'?" in msg
    assert "its functions: exact_match, length_or_none" in msg
    assert "_private_helper" not in msg and "THRESHOLD" not in msg
    assert "has no 'Scorer.score2'; did you mean 'score'?" in _config_error(f"{MOD}:Scorer.score2")


def test_not_callable():
    assert "is a float (0.5), not a function" in _config_error("reward_fns/tasks.py:THRESHOLD", base_dir=HERE)
    assert "is a float (3.5), not a function" in _config_error(f"{MOD}:NOT_A_FUNCTION")


@pytest.mark.parametrize("fn_name, expect", [
    ("two_args", "does not accept 'prompts' or 'completions'"),
    ("no_prompts", "does not accept 'prompts'"),
    ("positional_only", "parameter 'prompts' is positional-only"),
])
def test_wrong_signature(fn_name, expect):
    msg = _config_error(f"{MOD}:{fn_name}")
    assert expect in msg and "fn(prompts, completions, **columns)" in msg and "got (" in msg


# ------------------------------------------------------------------------------------------- calling


def test_reward_function_from_spec_and_call():
    rf = RewardFunction.from_spec("exact", "reward_fns/tasks.py:exact_match", FIELD, base_dir=HERE)
    assert (rf.name, rf.spec, rf.is_async) == ("exact", "reward_fns/tasks.py:exact_match", False)
    assert rf.required_columns == ("answer",)
    assert rf(P4, C4, COLS) == [1.0, 0.0, 1.0, 0.0]


def test_spec_defaults_to_module_and_name():
    assert RewardFunction("e", exact_match).spec == f"{MOD}:exact_match"


def test_none_means_not_applicable():
    rf = RewardFunction.from_spec("len", "reward_fns/tasks.py:length_or_none", FIELD, base_dir=HERE)
    out = rf(P4, C4, COLS)
    assert out[:3] == [1.0, 1.0, 1.0] and math.isnan(out[3])


def test_columns_passed_by_name_and_kwargs():
    assert RewardFunction("n", by_name_only)(P4, C4, COLS) == [1.0, 0.0, 1.0, 0.0]  # 'id' not passed
    assert RewardFunction("d", with_default)(P4, C4, COLS) == [1.0, 1.0, 1.0, 0.0]
    assert RewardFunction("d", with_default)(P4, C4, {**COLS, "bonus": [1] * 4}) == [2.0, 2.0, 2.0, 1.0]
    RewardFunction("k", echo_kwargs)(P4, C4, COLS)
    assert echo_kwargs.seen == COLS  # everything but prompts/completions
    assert RewardFunction("c", completions_only)(P4, C4) == [1.0, 1.0, 1.0, 0.0]
    assert RewardFunction("o", keyword_only)(P4, C4) == [0.0] * 4
    assert RewardFunction("s", scorer)(P4, C4) == [0.5] * 4


def test_async_function():
    rf = RewardFunction("alen", async_len)
    assert rf.is_async
    assert rf(P4, C4, COLS) == [1.0, 1.0, 1.0, 0.0]
    # from another thread
    result = {}
    t = threading.Thread(target=lambda: result.update(out=rf(P4, C4, COLS)))
    t.start()
    t.join(10)
    assert result["out"] == [1.0, 1.0, 1.0, 0.0]

    # from inside a running event loop (a Ray async actor calling a sync method)
    async def inside():
        return rf(P4, C4, COLS)

    assert asyncio.run(inside()) == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("out", [
    (1, 0.5, True, None),
    [np.float64(1.0), 0, -2.5, 7],
    torch.tensor([1.0, 0.5, 1.0, 2.0]),
    np.array([1, 0, 1, 2], dtype=np.int64),
    [np.float32(1.0), np.int16(0), np.bool_(True), torch.tensor(2.0)],
])
def test_accepted_return_values(out):
    got = RewardFunction("r", returns(out))(P4, C4)
    assert len(got) == 4 and all(isinstance(x, float) for x in got) and got[0] == 1.0


@pytest.mark.parametrize("out, expect", [
    ([1.0, 0.0, 1.0], "returned 3 values for 4 completions"),
    ([], "returned 0 values for 4 completions"),
    ([1.0, 0.0, "abc", 1.0], "value 2 is 'abc' (str), not a number"),
    ([1.0, float("nan"), 0.0, 1.0], "value 1 is nan, not a finite number (return None for 'not applicable')"),
    ([1.0, 0.0, 0.0, -math.inf], "value 3 is -inf, not a finite number"),
    ([[1.0], 0.0, 0.0, 0.0], "value 0 is [1.0] (list), not a number"),
    ([1j, 0.0, 0.0, 0.0], "value 0 is 1j (complex), not a number"),
    ([10 ** 400, 0, 0, 0], "too large for a float"),
    ([torch.tensor([1.0]), 0, 0, 0], "value 0 is a tensor of shape (1,), not a number"),
    (1.0, "returned 1.0 (float); expected a list with one value for each of 4 completions"),
    ("1100", "returned '1100' (str); expected a list"),
    (None, "returned None (NoneType); expected a list"),
    ((x for x in range(4)), "(generator); expected a list"),
    (torch.zeros(4, 1), "returned a tensor of shape (4, 1); expected one value for each of 4 completions"),
    (np.zeros((2, 2)), "returned an array of shape (2, 2)"),
    (torch.tensor([1.0, float("inf"), 0.0, 0.0]), "value 1 is inf, not a finite number"),
])
def test_bad_return_values(out, expect):
    msg = _call_error(RewardFunction("bad", returns(out), "tasks.py:bad"))
    assert expect in msg, msg


def test_exception_inside_is_wrapped_with_cause():
    rf = RewardFunction("boom", boom)
    with pytest.raises(RewardFunctionError) as info:
        rf(P4, C4, COLS, step=7)
    msg = str(info.value)
    assert msg.startswith(f"reward function 'boom' ({MOD}:boom) at step 7: raised ZeroDivisionError: division by zero")
    assert isinstance(info.value.__cause__, ZeroDivisionError) and info.value.step == 7
    assert "test_rewards.py:" in msg  # where it was raised


def test_exception_inside_async_is_wrapped():
    msg = _call_error(RewardFunction("aboom", async_boom))
    assert "raised KeyError: 'server said no'" in msg


def test_missing_column_at_call_time():
    msg = _call_error(RewardFunction("n", by_name_only), out_columns={"id": COLS["id"]})
    assert "requires keyword 'answer' that the data does not have (its columns: id)" in msg


def test_caller_mistakes_are_value_errors():
    rf = RewardFunction("e", exact_match)
    with pytest.raises(ValueError, match="3 prompts for 4 completions"):
        rf(P4[:3], C4, COLS)
    with pytest.raises(ValueError, match="column 'answer' has 2 entries for 4 completions"):
        rf(P4, C4, {"answer": ["a", "b"]})
    with pytest.raises(ValueError, match="may not be called 'completions'"):
        rf(P4, C4, {**COLS, "completions": C4})


def test_pickles_by_spec(tmp_path):
    _write(tmp_path, "task.py", "def fn(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    rf = RewardFunction.from_spec("two", "task.py:fn", FIELD, base_dir=tmp_path)
    data = pickle.dumps(rf)
    del sys.modules[rf.fn.__module__]  # as in another process: the unique module is not there
    back = pickle.loads(data)
    assert (back.name, back.spec) == ("two", "task.py:fn") and back(["p"], ["c"]) == [2.0]
    assert pickle.loads(pickle.dumps(RewardFunction("e", exact_match))).fn is exact_match


# ----------------------------------------------------------------------------------- check_function


def test_check_function_ok():
    check_function(RewardFunction("e", exact_match), FIELD, ["answer", "id"])
    check_function(RewardFunction("k", echo_kwargs), FIELD, [])
    check_function(RewardFunction("d", with_default), FIELD, [])


def test_check_function_missing_column():
    with pytest.raises(ConfigError) as info:
        check_function(RewardFunction("exact", exact_match), FIELD, ["question", "id"])
    assert str(info.value) == (f"{FIELD}: reward function 'exact' ({MOD}:exact_match) requires keyword 'answer' "
                               f"that the prompt data does not have (its columns: question, id)")
    with pytest.raises(ConfigError, match="it has no columns besides the prompt"):
        check_function(RewardFunction("exact", exact_match), FIELD, [])


def test_check_function_trl_extras_hint():
    check_function(RewardFunction("t", needs_trainer_state), FIELD, ["answer"])  # given by the learner, as TRL
    with pytest.raises(ConfigError, match="TRL's log_metric is not provided here"):
        check_function(RewardFunction("m", needs_log_metric), FIELD, ["answer"])


def test_check_function_bad_signature_and_clashing_column():
    with pytest.raises(ConfigError, match=r"^rewards\[1\]\.function: reward function 'x' .* does not accept"):
        check_function(RewardFunction("x", two_args), FIELD, ["answer"])
    with pytest.raises(ConfigError, match=r"^rewards\[1\]\.function: the prompt data has a column 'prompts'"):
        check_function(RewardFunction("e", exact_match), FIELD, ["answer", "prompts"])


# -------------------------------------------------------------------------------------------- combine

nan = float("nan")


def test_combine_by_hand():
    # total = 0.5 * a + 2 * b = [0.5 + 0.4, 0 + 0.8, 0.5 + 2.0] = [0.9, 0.8, 2.5]; mean 1.4
    # std: deviations -0.5, -0.6, 1.1 -> (0.25 + 0.36 + 1.21) / 2 = 0.91
    # a: mean 2/3, deviations 1/3, -2/3, 1/3 -> (6/9) / 2 = 1/3;  b: mean 1.6/3, var 0.346667 / 2
    total, stats = combine({"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor([0.2, 0.4, 1.0])},
                           {"a": 0.5, "b": 2.0})
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, torch.tensor([0.9, 0.8, 2.5]))
    expect = {"rewards/a/mean": 2 / 3, "rewards/a/std": math.sqrt(1 / 3), "rewards/b/mean": 1.6 / 3,
              "rewards/b/std": math.sqrt(0.346667 / 2), "reward": 1.4, "reward_std": math.sqrt(0.91)}
    assert stats.keys() == expect.keys()
    for k, v in expect.items():
        assert stats[k] == pytest.approx(v, rel=1e-5), k


def test_combine_nan_not_applicable():
    # a = [1, -, -, 0], b = [-, 2, -, 1], weights 1 and 3: nansum per row -> [1, 6, NaN (all NaN), 0 + 3]
    a, b = torch.tensor([1.0, nan, nan, 0.0]), torch.tensor([nan, 2.0, nan, 1.0])
    total, stats = combine({"a": a, "b": b}, {"a": 1.0, "b": 3.0})
    assert total[[0, 1, 3]].tolist() == [1.0, 6.0, 3.0] and math.isnan(total[2])
    # reward over the scorable rows [1, 6, 3]: mean 10/3, deviations -7/3, 8/3, -1/3 -> (49 + 64 + 1) / 9 / 2
    assert stats["reward"] == pytest.approx(10 / 3) and stats["reward_std"] == pytest.approx(math.sqrt(114 / 18))
    # per reward over its own non-NaN rows: a = [1, 0], b = [2, 1]
    assert stats["rewards/a/mean"] == pytest.approx(0.5) and stats["rewards/a/std"] == pytest.approx(math.sqrt(0.5))
    assert stats["rewards/b/mean"] == pytest.approx(1.5) and stats["rewards/b/std"] == pytest.approx(math.sqrt(0.5))
    assert torch.isnan(a[1]) and torch.isnan(b[0])  # inputs untouched


def test_combine_degenerate_stats():
    total, stats = combine({"a": torch.tensor([nan, nan]), "b": torch.tensor([1.0, nan])}, {"a": 1.0, "b": 1.0})
    assert total[0] == 1.0 and math.isnan(total[1])
    assert math.isnan(stats["rewards/a/mean"]) and math.isnan(stats["rewards/a/std"])  # never applicable
    assert stats["rewards/b/mean"] == 1.0 and math.isnan(stats["rewards/b/std"])  # one value: no std
    assert stats["reward"] == 1.0 and math.isnan(stats["reward_std"])


def test_combine_weights():
    r = {"a": [1.0, 2.0], "b": [10.0, nan]}  # lists are accepted too
    assert combine(r, {"a": 1.0, "b": 0.0})[0].tolist() == [1.0, 2.0]
    assert combine(r, {"a": -1.0, "b": 0.5})[0].tolist() == [4.0, -2.0]
    single, stats = combine({"only": torch.tensor([3.0, 1.0])}, {"only": 2.0})
    assert single.tolist() == [6.0, 2.0] and stats["reward"] == 4.0 and stats["rewards/only/mean"] == 2.0


def test_combine_matches_numpy_and_row_order():
    gen = torch.Generator().manual_seed(0)
    vals = {k: torch.randn(64, generator=gen) for k in ("x", "y", "z")}
    for k, v in vals.items():
        v[torch.rand(64, generator=gen) < 0.3] = nan
    vals["x"][:3] = vals["y"][:3] = vals["z"][:3] = nan  # some unscorable rows for sure
    w = {"x": 0.7, "y": -1.3, "z": 2.0}
    total, stats = combine(vals, w)
    arr = np.stack([vals[k].double().numpy() for k in w], axis=1)
    expect = np.nansum(arr * np.array(list(w.values())), axis=1)
    expect[np.isnan(arr).all(axis=1)] = np.nan
    np.testing.assert_allclose(total.numpy(), expect, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert stats["reward"] == pytest.approx(np.nanmean(expect), rel=1e-5)
    assert stats["reward_std"] == pytest.approx(np.nanstd(expect, ddof=1), rel=1e-5)
    for k in w:
        assert stats[f"rewards/{k}/std"] == pytest.approx(np.nanstd(vals[k].numpy(), ddof=1), rel=1e-5)
    perm = torch.randperm(64, generator=gen)
    total_p, stats_p = combine({k: v[perm] for k, v in vals.items()}, w)
    torch.testing.assert_close(total_p, total[perm], equal_nan=True)
    assert stats_p == pytest.approx(stats, rel=1e-5)


def test_nanstd_matches_bessel():
    assert nanstd(torch.tensor([1.0, nan, 3.0])).item() == pytest.approx(math.sqrt(2.0))
    assert math.isnan(nanstd(torch.tensor([1.0, nan])).item())


def test_combine_bad_input():
    with pytest.raises(ValueError, match="no weight for \\['b'\\]"):
        combine({"a": [1.0], "b": [1.0]}, {"a": 1.0})
    with pytest.raises(ValueError, match="no values for \\['c'\\]"):
        combine({"a": [1.0]}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="reward 'b' has shape \\(3,\\)"):
        combine({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="no rewards"):
        combine({}, {})
