"""The one-word task (marl_ray.data.one_word): its checker, its reward function in both of TRL's forms, its
seeded prompts and held-out split; and `marl-ray demo --task one-word` from the command line (a smoke
run of 1 GRPO step on SmolLM2-135M-Instruct), with its refusal of an output folder it cannot create."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_the_checker_accepts_exactly_one_word():
    from marl_ray.data.one_word import is_one_word

    for yes in ("Apple", " apple.\n", "Blue-green!", "o'clock", "Jupiter?", "Paris"):
        assert is_one_word(yes), yes
    for no in ("", " ", ".", "New York", "Apple, banana", "The answer is apple.", "apple..", "42", "Apple 🍎",
               "car.\nA car is a vehicle", "-apple", "apple-"):
        assert not is_one_word(no), no


def test_the_reward_reads_text_and_message_completions():
    from marl_ray.data.one_word import one_word

    prompts = ["Name a fruit. Answer with exactly one word."] * 3
    texts = ["Mango.", "I like mangoes.", "Kiwi"]
    assert one_word(prompts, texts) == [1.0, 0.0, 1.0]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    assert one_word(chats, messages, category=["fruit"] * 3) == [1.0, 0.0, 1.0]
    with pytest.raises(TypeError, match="a string or a list of messages"):
        one_word(prompts, [3])


def test_prompts_are_seeded_and_held_out_questions_are_never_trained_on():
    from marl_ray.data import one_word

    train, held = one_word.questions("train"), one_word.questions("eval")
    assert len(train) + len(held) == len(one_word.CATEGORIES) * len(one_word.QUESTIONS) * len(one_word.INSTRUCTIONS)
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.35
    assert not {t for t, _ in train} & {t for t, _ in held}
    rows = one_word.prompt_rows(20, seed=3, split="eval")
    assert rows == one_word.prompt_rows(20, seed=3, split="eval") != one_word.prompt_rows(20, seed=4, split="eval")
    assert len({r["messages"][0]["content"] for r in rows}) == 20
    for r in rows:
        (m,) = r["messages"]
        assert m["role"] == "user" and one_word.split_of(m["content"]) == "eval" and r["category"] in m["content"]
    with pytest.raises(ValueError, match="only .* distinct eval questions"):
        one_word.prompt_rows(len(held) + 1, split="eval")


def _demo(args, tmp_path, timeout=600):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "marl_ray", "demo", "--task", "one-word", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_an_output_folder_that_cannot_be_created_is_refused_before_anything_runs(tmp_path):
    proc = _demo(["--out", "/proc/nope"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--out: cannot create or write the output folder '/proc/nope'" in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_one_word_demo_runs_end_to_end(smollm2, tmp_path):
    out = tmp_path / "run"
    proc = _demo(["--quick", "--seed", "1", "--out", str(out), "--set", "ppo.steps=1", "--set", "ppo.batch_size=4",
                  "--set", "ppo.mini_batch_size=4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    # SmolLM2-135M's 134,515,008 weights plus the policy's LoRA (r=8 on q and v of 30 layers: 460,800)
    assert s["task"] == "one-word" and s["rl_steps"] == 1 and s["base_params"] == 134_515_008 + 460_800
    p = s["policies"]["grpo"]
    for key in ("greedy_before", "greedy_after", "sampled_before", "sampled_after", "reward_first", "reward_last"):
        assert 0.0 <= p[key] <= 1.0, (key, p)
    assert s["eval"]["prompts"] == 4 and s["eval"]["samples_per_prompt"] == 4
    assert (out / "ppo" / "policies" / "grpo" / "adapter_model.safetensors").exists()
    samples = json.loads((out / "samples.json").read_text())["grpo"]
    assert len(samples["before"]) == 4 and all(isinstance(x["reply"], str) for x in samples["before"])
    assert "| grpo |" in proc.stdout
    held = {json.loads(line)["messages"][0]["content"] for line in (out / "data" / "eval.jsonl").read_text().splitlines()}
    trained = {json.loads(line)["messages"][0]["content"]
               for line in (out / "data" / "prompts.jsonl").read_text().splitlines()}
    assert len(held) == 4 and not held & trained
