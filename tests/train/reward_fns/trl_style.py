"""Reward functions written the way TRL's GRPOTrainer documentation writes them, for
tests/train/test_trl_reward_conventions.py. Each records the keyword arguments it was called with in
CALLS, so the test can compare what marl-ray passes with what TRL's own trainer passes."""

import copy
import re

CALLS = []  # (function name, {keyword: value}) of every call


def _seen(name, **kwargs):
    if "trainer_state" in kwargs:  # as it is now: a trainer may change its state object later
        kwargs["trainer_state"] = copy.copy(kwargs["trainer_state"])
    CALLS.append((name, kwargs))


# ---------------------------------------------------------------- conversational data: message lists


def chat_length(completions, **kwargs):
    """Closer to 12 characters of assistant text, more reward."""
    _seen("chat_length", completions=completions, **kwargs)
    return [-abs(12 - len(completion[0]["content"])) / 12 for completion in completions]


def chat_format(completions, **kwargs):
    """1.0 where the assistant's text is made of letters and spaces only."""
    _seen("chat_format", completions=completions, **kwargs)
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.fullmatch(r"[A-Za-z ]+", content) else 0.0 for content in contents]


def chat_ground_truth(prompts, completions, ground_truth, **kwargs):
    """1.0 where the assistant's text mentions the row's ground_truth; the prompt's last message is the user's."""
    _seen("chat_ground_truth", prompts=prompts, completions=completions, ground_truth=ground_truth, **kwargs)
    assert all(prompt[-1]["role"] == "user" for prompt in prompts)
    return [float(truth in completion[0]["content"]) for completion, truth in zip(completions, ground_truth)]


# ---------------------------------------------------------------- text data: strings


def text_length(completions, **kwargs):
    """Closer to 12 characters, more reward."""
    _seen("text_length", completions=completions, **kwargs)
    return [-abs(12 - len(completion)) / 12 for completion in completions]


def text_format(completions, **kwargs):
    """1.0 where the completion is made of letters and spaces only."""
    _seen("text_format", completions=completions, **kwargs)
    return [1.0 if re.fullmatch(r"[A-Za-z ]+", completion) else 0.0 for completion in completions]


def text_ground_truth(prompts, completions, ground_truth, **kwargs):
    """1.0 where the completion mentions the row's ground_truth."""
    _seen("text_ground_truth", prompts=prompts, completions=completions, ground_truth=ground_truth, **kwargs)
    return [float(truth in completion) for completion, truth in zip(completions, ground_truth)]


# ---------------------------------------------------------------- either form


def token_budget(completion_ids, **kwargs):
    """Fewer completion tokens, more reward."""
    _seen("token_budget", completion_ids=completion_ids, **kwargs)
    return [-len(ids) / 10 for ids in completion_ids]


def warm_up(completions, trainer_state, **kwargs):
    """A reward that grows over the run: global_step / max_steps."""
    _seen("warm_up", completions=completions, trainer_state=trainer_state, **kwargs)
    return [trainer_state.global_step / trainer_state.max_steps] * len(completions)


def by_name(prompts, completions, completion_ids, trainer_state):
    """No **kwargs: gets exactly the keywords it names."""
    _seen("by_name", prompts=prompts, completions=completions, completion_ids=completion_ids,
          trainer_state=trainer_state)
    return [0.0] * len(completions)
