"""Reward functions get what TRL's GRPOTrainer gives them, in the same forms: for conversational data each
prompt as its list of messages and each completion as [{"role": "assistant", "content": TEXT}], for text
data strings; `completion_ids`, a `trainer_state` and the data set's other columns as keywords.

The reward functions (reward_fns/trl_style.py) are written the way TRL's documentation writes them and
record what they get. They run through a real Learner (in-process runtime) and through TRL 1.16's own
GRPOTrainer on the same tiny local model and data; the keywords and the form of every argument must agree.
A function written for the other form of data fails with an error naming it and the form it got."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import reliability_utils as ru

FNS = Path(__file__).parent / "reward_fns" / "trl_style.py"
TOPICS = ["film", "plot", "actor", "music", "scene"]
TRL_ONLY = {"log_extra", "log_metric"}  # TRL's logging hooks, which marl-ray does not pass
CHAT = ["chat_length", "chat_format", "chat_ground_truth", "token_budget", "warm_up"]
TEXT = ["text_length", "text_format", "text_ground_truth", "token_budget", "warm_up"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_rewards")
    ru.build_chat_base(root / "base")
    chat = [{"prompt": [{"role": "system", "content": "You review films."},
                        {"role": "user", "content": f"Say something about the {t}."}], "ground_truth": t}
            for t in TOPICS]
    text = [{"prompt": f"The {t} of this film was", "ground_truth": t} for t in TOPICS]
    for name, rows in (("chat", chat), ("text", text)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"base": str(root / "base"), "root": root, "chat": chat, "text": text}


def _config(assets, form, names, out, steps=2):
    return {
        "model": {"base": assets["base"]},
        "rewards": [{"name": n, "function": f"{FNS}:{n}"} for n in names],
        "policies": [{"name": "g", "reward": list(names), "algorithm": "grpo", "num_generations": 2, "lr": 1e-3,
                      "lora": {"r": 4, "alpha": 8}},
                     {"name": "r", "reward": [names[-1]], "algorithm": "reinforce_pp", "lr": 1e-3,
                      "lora": {"r": 4, "alpha": 8}}],
        "generation": {"max_new_tokens": 6, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": steps, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"rollout_workers": 1, "host_num_cpus": 1, "runtime": "inprocess"},
        "data": {"prompts": str(assets["root"] / f"{form}.jsonl"), "max_prompt_tokens": 64},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False},
    }


def _learner(cfg):
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    cfg = ru.load(cfg)
    actors = start_inprocess(cfg, seed=0)
    return Learner(cfg, actors.hosts, actors.workers, actors.worker_host)


def _marl_calls(assets, form, names, out, steps=2) -> dict[str, list[dict]]:
    """{reward name: [the keywords of each call]} of `steps` steps of a real Learner."""
    learner = _learner(_config(assets, form, names, out, steps))
    for _ in range(steps):
        learner.run_step()
    calls = {}
    for name, rf in learner.reward_fns.items():  # each reward loads its file anew: its own CALLS
        calls[name] = [kw for fn, kw in rf.fn.__globals__["CALLS"] if fn == name]
    return calls


def _trl_calls(assets, form, names, out) -> dict[str, list[dict]]:
    """The same reward functions under TRL's GRPOTrainer, one step on the same model and data."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("trl_style_under_trl", FNS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
                      max_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                      logging_strategy="no", seed=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["base"]),
                          reward_funcs=[getattr(module, n) for n in names], args=args,
                          train_dataset=Dataset.from_list(assets[form]),
                          processing_class=AutoTokenizer.from_pretrained(assets["base"]))
    trainer.train()
    return {n: [kw for fn, kw in module.CALLS if fn == n] for n in names}


def _form(v):
    """The form of an argument: types all the way down (list items merged, dict keys kept)."""
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _form(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("list", tuple(sorted({_form(x) for x in v}, key=repr)))
    return type(v).__name__


def _check_call(kw, rows, tok, where):
    """What a reward function got in one call, checked against the data (the same checks for both trainers)."""
    truth = {json.dumps(r["prompt"]): r["ground_truth"] for r in rows}
    n = len(next(iter(v for k, v in kw.items() if k in ("completions", "completion_ids"))))
    if "prompts" in kw:
        assert len(kw["prompts"]) == n and all(json.dumps(p) in truth for p in kw["prompts"]), where
    if "ground_truth" in kw:
        assert kw["ground_truth"] == [truth[json.dumps(p)] for p in kw["prompts"]], where
    if "completion_ids" in kw and "completions" in kw:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in kw["completions"]]
        assert tok.batch_decode(kw["completion_ids"], skip_special_tokens=True) == texts, where
    if "trainer_state" in kw:
        s = kw["trainer_state"]
        assert isinstance(s.global_step, int) and isinstance(s.max_steps, int) and 0 <= s.global_step < s.max_steps


@pytest.mark.parametrize("form", ["chat", "text"])
def test_reward_functions_get_what_trl_gives(assets, form, tmp_path):
    from transformers import AutoTokenizer

    names = CHAT if form == "chat" else TEXT
    tok = AutoTokenizer.from_pretrained(assets["base"])
    ours = _marl_calls(assets, form, names, tmp_path / "run")
    trl = _trl_calls(assets, form, names, tmp_path / "trl")
    for name in names:
        assert ours[name] and trl[name], name
        theirs = trl[name][0]
        for i, kw in enumerate(ours[name]):
            where = f"{name}, call {i}"
            assert set(kw) == set(theirs) - TRL_ONLY, where  # the same keywords, but TRL's logging hooks
            for k in kw:
                if k != "trainer_state":
                    assert _form(kw[k]) == _form(theirs[k]), (where, k, kw[k], theirs[k])
            _check_call(kw, assets[form], tok, where)
        _check_call(theirs, assets[form], tok, f"{name} under TRL")
    if form == "chat":  # the forms themselves, spelled out
        kw = ours["chat_ground_truth"][0]
        assert all(p in [r["prompt"] for r in assets["chat"]] for p in kw["prompts"])
        assert all(len(c) == 1 and set(c[0]) == {"role", "content"} and c[0]["role"] == "assistant"
                   for c in kw["completions"])
    else:
        kw = ours["text_ground_truth"][0]
        assert all(isinstance(p, str) and isinstance(c, str) for p, c in zip(kw["prompts"], kw["completions"]))
    # trainer_state: TRL's TrainerState fields where they mean the same, and which policy is scored
    states = [(kw["trainer_state"].policy, kw["trainer_state"].global_step, kw["trainer_state"].max_steps,
               kw["trainer_state"].algorithm) for kw in ours["warm_up"]]
    assert sorted(states) == [("g", 0, 2, "grpo"), ("g", 1, 2, "grpo"), ("r", 0, 2, "reinforce_pp"),
                              ("r", 1, 2, "reinforce_pp")]
    assert trl["warm_up"][0]["trainer_state"].global_step == 0 and trl["warm_up"][0]["trainer_state"].max_steps == 1


def test_a_function_without_kwargs_gets_what_it_names(assets, tmp_path):
    calls = _marl_calls(assets, "chat", ["by_name"], tmp_path / "run", steps=1)["by_name"]
    assert calls and all(set(kw) == {"prompts", "completions", "completion_ids", "trainer_state"} for kw in calls)
    for kw in calls:
        assert all(isinstance(t, int) for ids in kw["completion_ids"] for t in ids)
        assert all(1 <= len(ids) <= 6 for ids in kw["completion_ids"])  # up to the end of turn, no padding


@pytest.mark.parametrize("form, fn, got", [
    ("chat", "text_format", "it got conversational data: each prompt a list of {role, content} messages"),
    ("text", "chat_length", "it got text data: each prompt and each completion a str"),
])
def test_a_function_for_the_other_form_fails_clearly(assets, tmp_path, form, fn, got):
    from marl_ray.train.rewards import RewardFunctionError

    learner = _learner(_config(assets, form, [fn], tmp_path / "run", steps=1))
    with pytest.raises(RewardFunctionError) as e:
        learner.run_step()
    msg = str(e.value)
    assert msg.startswith(f"reward function {fn!r} ({FNS}:{fn}) at step 0: raised TypeError: "), msg
    assert got in msg and "trl_style.py:" in msg, msg  # the form it got, and where it failed
    assert e.value.name == fn


def test_completion_ids_and_trainer_state_are_not_data_columns(tmp_path):
    from marl_ray.config import ConfigError
    from marl_ray.train.rewards import RewardFunction, RewardFunctionError, RewardState, check_function

    spec = importlib.util.spec_from_file_location("trl_style_checks", FNS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rf = RewardFunction("b", module.by_name)
    check_function(rf, "rewards[0].function", ["ground_truth"])  # named, not columns: nothing missing
    with pytest.raises(ConfigError, match=r"rewards\[0\].function: the prompt data has a column 'completion_ids'"):
        check_function(rf, "rewards[0].function", ["completion_ids"])
    with pytest.raises(RewardFunctionError, match="requires 'completion_ids', 'trainer_state', which this call "
                                                  "does not give"):
        rf(["p"], ["c"])
    assert rf(["p"], ["c"], completion_ids=[[7, 2]], trainer_state=RewardState(3, 10)) == [0.0]
    assert module.CALLS[-1][1]["completion_ids"] == [[7, 2]] and module.CALLS[-1][1]["trainer_state"].global_step == 3


def test_the_documented_examples_print_what_they_say(capsys):
    """docs/rewards.md: each Python example runs, and each print gives the value its comment shows."""
    import ast
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) == 2  # one per form of data
    for block in blocks:
        expected = [ast.literal_eval(m) for m in re.findall(r"^print\(.*\)\s+# (.*)$", block, re.M)]
        assert expected, block
        exec(compile(block, "docs/rewards.md", "exec"), {})
        printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()]
        assert printed == expected


def test_a_trl_keyword_not_offered_is_named():
    from marl_ray.train.rewards import RewardFunction, RewardFunctionError

    def logs_a_metric(completions, **kwargs):
        kwargs["log_metric"]("mine", 1.0)
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"raised KeyError: 'log_metric' .*; TRL's log_metric is not "
                                                  r"provided here$"):
        RewardFunction("m", logs_a_metric)(["p"], ["c"], step=4)
