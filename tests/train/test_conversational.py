"""Conversational prompts end to end (in-process runtime, the learner of the Ray runs): a JSONL of
{messages, topic} rows on a base whose tokenizer has a ChatML chat template. The worker renders each
conversation with the template (generation prompt added), reward functions see the conversation's messages and
the row's other columns, and a completion stops at the template's end of turn (<|im_end|>) as at EOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reliability_utils as ru

FNS = Path(__file__).parent / "reward_fns" / "chat.py"
TOPICS = ["film", "plot", "actor", "music", "scene"]


@pytest.fixture(scope="module")
def chat_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    ru.build_chat_base(root / "base")
    rows = [{"messages": [{"role": "system", "content": "You review films."},
                          {"role": "user", "content": f"Say something about the {t}."}], "topic": t}
            for t in TOPICS * 2]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"base": str(root / "base"), "prompts": str(root / "chat.jsonl")}


def test_a_worker_stops_conversations_at_the_end_of_turn_token(chat_assets):
    from transformers import AutoTokenizer

    from marl_ray.data.prompts import end_of_turn_ids
    from marl_ray.runtime.rollout import RolloutWorker

    tok = AutoTokenizer.from_pretrained(chat_assets["base"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end]
    w = RolloutWorker(chat_assets["base"], chat_assets["prompts"], 0, 1, max_prompt_tokens=64)
    assert w.stop_token_ids == (im_end,)
    (pid, ids), = w.take(1)
    rendered = tok.apply_chat_template(json.loads(Path(chat_assets["prompts"]).read_text().splitlines()[pid])
                                       ["messages"], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_grpo_and_ppo_on_conversations(chat_assets, tmp_path):
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    cfg = ru.load(_chat_config(chat_assets, tmp_path / "run"))
    actors = start_inprocess(cfg, seed=0)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    metrics = learner.run_step()
    for p in ("g", "p"):
        assert metrics[p]["rewards/chat/mean"] == 1.0, metrics[p]  # the conversations with their columns


def _chat_config(chat_assets, out, steps=1, **data):
    return {
        "model": {"base": chat_assets["base"]},
        "rewards": [{"name": "chat", "function": f"{FNS}:conversation_with_topic"},
                    {"name": "short", "function": f"{FNS}:short"}],
        "policies": [{"name": "g", "reward": ["chat", "short"], "algorithm": "grpo", "num_generations": 2,
                      "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
                     {"name": "p", "reward": ["chat", "short"], "lr": 1e-3, "lora": {"r": 4, "alpha": 8}}],
        "generation": {"max_new_tokens": 6, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": steps, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"rollout_workers": 1, "host_num_cpus": 1, "runtime": "inprocess"},
        "data": {"prompts": chat_assets["prompts"], "max_prompt_tokens": 64, **data},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False, "eval_every": 1},
    }


def test_held_out_conversations_are_scored_before_during_and_after(chat_assets, tmp_path):
    from marl_ray.metrics import read_metrics
    from marl_ray.stages.ppo import run_ppo

    cfg = ru.load(_chat_config(chat_assets, tmp_path / "run", steps=2, eval_prompts=chat_assets["prompts"],
                               eval_size=3))
    summary = run_ppo(cfg)
    rows = read_metrics(tmp_path / "run" / "eval.jsonl")
    assert sorted((r["step"], r["policy"]) for r in rows) == [(s, p) for s in (0, 1, 2) for p in ("g", "p")]
    for r in rows:
        assert r["eval/rewards/chat/mean"] == 1.0, r  # the conversations, with their topic column
        assert r["eval/reward"] == pytest.approx(1.0 + r["eval/rewards/short/mean"])
        assert 1 <= r["eval/length"] <= 6
    assert summary["eval"]["steps"] == [0, 2] and summary["eval"]["prompts"] == 3
    assert set(summary["eval"]["after"]) == {"g", "p"}
    samples = read_metrics(tmp_path / "run" / "samples.jsonl")  # run.log_samples (2) per policy per step
    assert sorted((r["step"], r["policy"]) for r in samples) == sorted((s, p) for s in (0, 1) for p in "gp" for _ in "ab")
    for r in samples:
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["topic"] in r["prompt"]
        assert isinstance(r["completion"], str) and r["reward"] == pytest.approx(1.0 - len(r["completion"]) / 10)


def test_eval_fraction_holds_prompts_out_of_training(chat_assets, tmp_path):
    from marl_ray.data.prompts import eval_rows, held_out
    from marl_ray.runtime.rollout import RolloutWorker

    cfg = ru.load(_chat_config(chat_assets, tmp_path / "run", eval_fraction=0.5))
    prompts, columns = eval_rows(cfg.data)
    assert prompts and all(held_out(p, 0.5) for p in prompts)
    w = RolloutWorker(chat_assets["base"], chat_assets["prompts"], 0, 1, max_prompt_tokens=64, eval_fraction=0.5)
    trained = list(w.texts.values())
    assert trained and not any(held_out(p, 0.5) for p in trained)
    assert not [p for p in prompts if p in trained]


def test_bad_held_out_settings_are_refused_before_any_actor(chat_assets, tmp_path):
    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import check_inputs

    with pytest.raises(ConfigError, match="data.eval_fraction: give eval_prompts or eval_fraction, not both"):
        ru.load(_chat_config(chat_assets, tmp_path, eval_prompts=chat_assets["prompts"], eval_fraction=0.2))
    with pytest.raises(ConfigError, match="data.eval_prompts: .*missing.jsonl' does not exist"):
        check_inputs(ru.load(_chat_config(chat_assets, tmp_path, eval_prompts=str(tmp_path / "missing.jsonl"))))
    no_topic = tmp_path / "no_topic.jsonl"
    no_topic.write_text(json.dumps({"prompt": "a plain text"}) + "\n")
    with pytest.raises(ConfigError, match=r"rewards\[0\].function \(on data.eval_prompts\).*topic"):
        check_inputs(ru.load(_chat_config(chat_assets, tmp_path, eval_prompts=str(no_topic))))
