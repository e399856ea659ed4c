"""Episodes (in-process runtime, the learner of the Ray runs): multi-turn rounds with tools, several roles on
one base, each policy learning from its own turns only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import episode_utils as eu
import reliability_utils as ru

ENVS = Path(__file__).parent / "envs.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    rows = [{"prompt": [{"role": "user", "content": eu.QUESTION}], "a": 2, "b": 3}] * 4
    plain = [{"prompt": [{"role": "user", "content": f"Say something about the {t}."}]}
             for t in ("film", "plot", "actor", "music")]
    return {"taught": eu.chat_base(root / "taught", taught=True), "plain": eu.chat_base(root / "plain", tools=False),
            "sums": eu.write_rows(root / "sums.jsonl", rows), "chat": eu.write_rows(root / "chat.jsonl", plain)}


def _config(base, prompts, out, episodes=None, policies=None, rewards=(), gen=None, **ppo):
    return {
        "model": {"base": base},
        "rewards": list(rewards),
        "policies": policies or [{"name": "g", "reward": [], "algorithm": "grpo", "num_generations": 2, "lr": 1e-2,
                                  "lora": {"r": 4, "alpha": 8}}],
        "generation": gen or {"max_new_tokens": 6, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": 1, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1, "rollout_logprobs": False, **ppo},
        "cluster": {"rollout_workers": 1, "host_num_cpus": 1, "runtime": "inprocess"},
        "data": {"prompts": prompts, "max_prompt_tokens": 64},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False, "log_samples": 0},
        **({"episodes": episodes} if episodes else {}),
    }


def _learner(cfg_dict):
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    cfg = ru.load(cfg_dict)
    actors = start_inprocess(cfg, seed=0)
    return Learner(cfg, actors.hosts, actors.workers, actors.worker_host), actors.hosts[0]._obj


def test_a_one_turn_episode_gives_the_single_turn_update(assets, tmp_path):
    """Same prompts, seeds and rewards: the episode path's rows, scores and update are the single-turn path's."""
    single, host1 = _learner(_config(assets["plain"], assets["chat"], tmp_path / "a", rewards=[
        {"name": "len", "function": f"{ENVS}:length"}], policies=[
        {"name": "g", "reward": ["len"], "algorithm": "grpo", "num_generations": 2, "lr": 1e-2,
         "lora": {"r": 4, "alpha": 8}}]))
    episodic, host2 = _learner(_config(assets["plain"], assets["chat"], tmp_path / "b",
                                       episodes={"environment": f"{ENVS}:OneTurn", "max_turns": 1, "max_tokens": 6}))
    before = host1.checksum("g")
    assert host2.checksum("g") == before
    b1, b2 = single.rollout(), episodic.rollout()
    for f in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(b1, f), getattr(b2, f)), f
    assert b1.group_ids == b2.group_ids and b1.policies == b2.policies
    for L, b in ((single, b1), (episodic, b2)):
        ev = L.evaluate(b)
        adv = L.advantages(b, ev)
        L.train(b, ev, adv)
    r1, _ = single.rewards(b1, None)
    assert torch.equal(r1, b2.rewards_B) and float(r1.std()) > 0  # the rewards differ within a group: a real update
    assert host1.checksum("g") != before
    assert host1.checksum("g") == host2.checksum("g")  # bit-identical update


def test_a_tool_episode_masks_the_tool_result_and_calls_the_tool_with_the_parsed_arguments(assets, tmp_path):


    L, host = _learner(_config(
        assets["taught"], assets["sums"], tmp_path / "run",
        episodes={"environment": f"{ENVS}:Calculator", "max_turns": 2, "max_tokens": 160},
        gen={"max_new_tokens": 64, "min_new_tokens": 1, "stop_at_eos": True, "top_k": 1}))
    episodes = []
    real_start = L.episodes.start

    def start(*a):
        ep = real_start(*a)
        episodes.append(ep)
        return ep

    L.episodes.start = start  # only records the episodes the runner makes
    batch = L.rollout()
    assert len(episodes) == 4 and all(ep.env.calls == [(2, 3)] for ep in episodes)  # add(a=2, b=3) ran once each
    assert all(ep.tool_calls == 1 and ep.tool_failures == 0 and ep.turns == 2 for ep in episodes)
    tok = L.episodes.tokenizer
    P = batch.response_start
    for i in range(len(batch.policies)):
        ids = batch.input_ids[i, P:][batch.attention_mask[i, P:].bool()].tolist()
        own = batch.response_mask[i][: len(ids)].tolist()
        runs, k = [], 0  # (mask, text) of each run of equal mask
        while k < len(ids):
            j = k
            while j < len(ids) and own[j] == own[k]:
                j += 1
            runs.append((own[k], tok.decode(ids[k:j])))
            k = j
        assert [m for m, _ in runs] == [1, 0, 1], runs  # call | tool result | answer
        assert eu.CALL in runs[0][1]
        tight = "".join(runs[1][1].split())  # the tokenizer decodes a space after a special token
        assert "<|im_start|>tool5<|im_end|>" in tight and tight.endswith("<|im_start|>assistant")
        assert "It is 5." in runs[2][1]  # the taught base read the result
    assert batch.rewards_B.tolist() == [1.0] * 4
    ev = L.evaluate(batch)
    adv = L.advantages(batch, ev)
    assert all(float(a.mask.sum()) == float(batch.response_mask[a.rows].sum()) for a in adv.values())
    L.train(batch, ev, adv)  # every reward equal: grpo's advantages are 0; the update runs (and changes nothing big)


def test_roles_played_by_ref_never_change_and_idle_policies_get_no_update(assets, tmp_path):
    pol = [{"name": "s", "reward": [], "algorithm": "grpo", "num_generations": 2, "lr": 1e-2,
            "lora": {"r": 4, "alpha": 8}},
           {"name": "idle", "reward": [], "algorithm": "grpo", "num_generations": 2, "lr": 1e-2,
            "lora": {"r": 4, "alpha": 8}}]
    L, host = _learner(_config(assets["plain"], assets["chat"], tmp_path / "run", policies=pol, episodes={
        "environment": f"{ENVS}:AskAnswer", "max_turns": 2, "max_tokens": 40,
        "players": [{"role": "asker", "policy": "ref"}, {"role": "answerer", "policy": "s"}]}))
    base, idle, s = host.base_checksum(), host.checksum("idle"), host.checksum("s")
    metrics = L.run_step()
    assert host.base_checksum() == base and host.checksum("idle") == idle
    assert host.checksum("s") != s
    assert metrics["s"]["episodes/turns"] == 2 and "episodes/turns" not in metrics["idle"]


def test_a_policy_learns_only_from_its_own_turns(assets, tmp_path):
    """Self-play: one policy in both roles. The gradient of its rows is exactly zero when its own turns are
    masked out, and does not move when the advantages of other roles' tokens change."""
    L, host = _learner(_config(assets["plain"], assets["chat"], tmp_path / "run", episodes={
        "environment": f"{ENVS}:Dialogue", "max_turns": 3, "max_tokens": 120,
        "players": [{"role": "asker", "policy": "g"}, {"role": "answerer", "policy": "g"}]}))
    batch = L.rollout()
    assert batch.policies == ["g"] * 8  # 2 data rows x 2 roles x 2 episodes
    ev = L.evaluate(batch)
    adv = L.advantages(batch, ev)
    L.hosts.keep_advantages(batch.kept[0], adv, batch.holder, batch.hold_index, batch.response_mask.shape)
    mb = host.kept_rows(L.token, list(range(8)))
    own = batch.response_mask.float()
    context = batch.attention_mask[:, batch.response_start:].float() * (1 - own)
    assert float(own.sum()) > 0 and float(context.sum()) > 0  # the asker's rows hold the answerer's turn
    mb.advantages = torch.randn(mb.advantages.shape, generator=torch.Generator().manual_seed(0))
    loss = L.loss["g"]

    def grads(m):
        g = host.trainers["g"].gradients(m, float(m.mask.sum().clamp(min=1)), loss).grads
        return torch.cat([t.flatten() for _, t in sorted(g.items())])

    g_own = grads(mb)
    assert float(g_own.abs().sum()) > 0
    masked = mb.take(list(range(8)))
    masked.mask = mb.mask * (1 - own)  # its own turns masked out: other roles' tokens left
    assert float(grads(masked).abs().max()) == 0.0
    moved = mb.take(list(range(8)))
    moved.advantages = mb.advantages + 100.0 * context  # others' tokens: any advantage
    assert torch.equal(grads(moved), g_own)


@pytest.mark.parametrize("env,players,match", [
    ("NoReset", None, "no reset method"),
    ("BadTool", None, "no usable schema"),
    ("Missing", None, "has no 'Missing'"),
    ("AskAnswer", [{"role": "asker", "policy": "g"}], "have no player"),
    ("AskAnswer", [{"role": "asker", "policy": "g"}, {"role": "judge", "policy": "g"}], "not roles of"),
])
def test_bad_environments_are_refused_before_any_actor(assets, tmp_path, env, players, match):
    """run_ppo's input checks refuse them (no actor exists yet), and so does the runner itself."""
    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import check_inputs

    ep = {"environment": f"{ENVS}:{env}"}
    if players:
        ep["players"] = players
    cfg = _config(assets["plain"], assets["chat"], tmp_path / "run", episodes=ep)
    with pytest.raises(ConfigError, match=match):
        check_inputs(ru.load(cfg))
    with pytest.raises(ConfigError, match=match):
        _learner(cfg)


def test_config_errors_name_the_field(assets, tmp_path):
    from marl_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"episodes.players\[0\].policy: 'nobody' is not a policy"):
        ru.load(_config(assets["plain"], assets["chat"], tmp_path, episodes={
            "environment": f"{ENVS}:OneTurn", "players": [{"role": "assistant", "policy": "nobody"}]}))
    with pytest.raises(ConfigError, match="frozen adapters .* not yet"):
        ru.load(_config(assets["plain"], assets["chat"], tmp_path, episodes={
            "environment": f"{ENVS}:OneTurn", "players": [{"role": "assistant", "policy": "runs/x/policies/g"}]}))
    with pytest.raises(ConfigError, match="policies.0..reward: name at least one reward"):
        ru.load(_config(assets["plain"], assets["chat"], tmp_path))


def test_a_tool_environment_needs_a_template_that_renders_tools(assets, tmp_path):
    from marl_ray.config import ConfigError

    from marl_ray.stages.ppo import check_inputs

    with pytest.raises(ConfigError, match="does not render tools"):
        check_inputs(ru.load(_config(assets["plain"], assets["sums"], tmp_path / "run",
                                     episodes={"environment": f"{ENVS}:Calculator"})))


def test_tool_calls_are_parsed_as_the_templates_write_them():
    from marl_ray.episodes import parse_tool_calls

    text = 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert parse_tool_calls(text) == ("Let me add.", [{"type": "function", "function": {
        "name": "add", "arguments": {"a": 2, "b": 3}}}])
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')[1][0][
        "function"]["arguments"] == {"x": 1}
    assert parse_tool_calls("<tool_call>{not json}</tool_call> ok") == ("<tool_call>{not json}</tool_call> ok", [])


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("calculator.py", []), ("proposer_solver.py", ["--runtime", "ray"]),
                                         ("proposer_solver.py", ["--self-play"])])
def test_the_examples_run(tmp_path, script, args):
    """examples/episodes as docs/episodes.md runs them (one step); the two-policy one on a real local Ray."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, f"examples/episodes/{script}", str(tmp_path), "--steps", "1", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "ppo_summary.json").read_text())
    assert summary["steps"] == 1
    for p, m in summary["policies"].items():
        assert m["episodes/turns"] >= 1 and "rewards/env/mean" in m, (p, m)
        assert (tmp_path / "run" / "policies" / p / "adapter_model.safetensors").exists()
