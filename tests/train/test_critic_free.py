"""Several algorithms on one base in one run: ppo, grpo, rloo and reinforce_pp policies side by side,
scored by a reward adapter, reward functions (by file path, with a prompt column) or both.

In-process runtime (the same learner as on Ray). Checks: every policy trains and only its own
adapter moves; critic-free policies carry no value head; groups are G completions of one prompt;
the per-reward metrics are there; a grpo policy with beta 0 scored by functions alone runs no
scoring pass at all; a reward function that raises stops the run with a checkpoint of the last
good state; bad reward functions are refused before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import reliability_utils as ru

FNS = Path(__file__).parent / "reward_fns" / "vowels.py"
ANSWERS = ["the", "a", "film", "and", "of", "is"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = ru.build_assets(tmp_path_factory.mktemp("cf_assets"))
    rows = [{"prompt": p, "answer": ANSWERS[i % len(ANSWERS)]} for i, p in enumerate(ru.PROMPTS)]
    path = Path(a["root"]) / "prompts_answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**a, "prompts": str(path)}


def _config(assets, out, policies, rewards=None, **sections):
    cfg = ru.run_config(assets, out, **sections)
    cfg["rewards"] = rewards or [{"name": "rm", "path": assets["reward"]},
                                 {"name": "vowels", "function": f"{FNS}:vowel_fraction"},
                                 {"name": "answer", "function": f"{FNS}:mentions_answer"}]
    cfg["policies"] = policies
    return cfg


POLICIES = [
    {"name": "pp", "reward": "rm", "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
    {"name": "gr", "reward": ["rm", "vowels"], "reward_weights": [0.5, 2.0], "algorithm": "grpo",
     "num_generations": 3, "beta": 0.04, "loss_type": "grpo", "epsilon_high": 0.28, "lr": 1e-3,
     "lora": {"r": 4, "alpha": 8}},
    {"name": "rl", "reward": ["vowels", "answer"], "algorithm": "rloo", "num_generations": 2, "loss_type": "dr_grpo",
     "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
    {"name": "rp", "reward": "rm", "reward_weight": -1.0, "algorithm": "reinforce_pp", "lr": 1e-3,
     "lora": {"r": 4, "alpha": 8}},
]


def test_four_algorithms_train_together_on_one_base(assets, tmp_path):
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    cfg = ru.load(_config(assets, tmp_path / "run", POLICIES, ppo={"steps": 2, "ppo_epochs": 2}))
    actors = start_inprocess(cfg, seed=0)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    host = actors.hosts[0]._obj
    assert set(host.model.value_heads) == {"pp"}, "only ppo has a critic"
    batch = learner.rollout()
    B = cfg.ppo.batch_size
    assert [batch.policies.count(p) for p in ("pp", "gr", "rl", "rp")] == [B, 3 * B, 2 * B, B]
    for p, G in (("gr", 3), ("rl", 2), ("pp", 1)):
        rows = batch.rows(p)
        groups = {}
        for i in rows:
            groups.setdefault(batch.group_ids[i], []).append(i)
        assert len(groups) == B and all(len(g) == G for g in groups.values())
        for g in groups.values():  # a group is one prompt
            assert len({batch.prompt_ids[i] for i in g}) == 1
    assert all(c["answer"] in ANSWERS for c in batch.columns)
    ev = learner.evaluate(batch)
    ref_rows = [i for i, p in enumerate(batch.policies) if p == "rl"]
    assert bool((ev.ref_logprobs_BR[ref_rows] == 0).all()), "rloo with beta 0 reads no reference"
    assert bool(torch.isnan(ev.scores_B[ref_rows]).all()), "rloo is scored by functions alone"
    adv = learner.advantages(batch, ev)
    for p in ("gr", "rl"):  # one advantage per sequence, the group's rewards centred
        a = adv[p]
        per_seq = (a.advantages * a.mask).sum(1) / a.mask.sum(1).clamp(min=1)
        for g in set(batch.group_ids[i] for i in a.rows):
            idx = [k for k, i in enumerate(a.rows) if batch.group_ids[i] == g]
            assert abs(float(per_seq[idx].sum())) < 1e-4
    before = {p: learner.hosts.checksums(p)[0] for p in learner.policies}
    rm_before = host.role_checksum("rm")
    history = learner.fit()
    after = {p: learner.hosts.checksums(p)[0] for p in learner.policies}
    assert all(before[p] != after[p] for p in before), (before, after)
    assert host.role_checksum("rm") == rm_before
    m = history[-1]["metrics"]
    assert {"rewards/rm/mean", "rewards/vowels/mean", "rewards/vowels/std", "reward/frac_zero_std"} <= set(m["gr"])
    assert {"rewards/vowels/mean", "rewards/answer/mean"} <= set(m["rl"])
    assert "val/mean" in m["pp"] and "val/mean" not in m["gr"]
    assert all(torch.isfinite(torch.tensor(v)) for v in m["gr"].values() if isinstance(v, float))
    # saved critic-free policies have no value head file; they load back (resume) as they were
    path = learner.save_checkpoint()
    assert not (path / "policies" / "gr" / "value_head.safetensors").exists()
    assert (path / "policies" / "pp" / "value_head.safetensors").exists()
    sums = learner.checksums()
    learner.load_checkpoint(str(path))
    assert learner.checksums() == sums


def test_grpo_with_beta_0_and_function_rewards_runs_no_scoring_pass(assets, tmp_path, monkeypatch):
    """The reference pass is skipped when beta is 0, and with the decode steps' logprobs (fp32) and
    function rewards alone there is nothing left to score: evaluate runs no forward at all."""
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    policies = [{"name": "g", "reward": "vowels", "algorithm": "grpo", "num_generations": 4, "lr": 1e-3,
                 "lora": {"r": 4, "alpha": 8}}]
    cfg = ru.load(_config(assets, tmp_path / "run", policies, ppo={"steps": 1}))
    actors = start_inprocess(cfg, seed=0)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    model = actors.hosts[0]._obj.model
    calls = []
    real = type(model).hidden
    monkeypatch.setattr(type(model), "hidden", lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
    batch = learner.rollout()
    calls.clear()
    learner.evaluate(batch)
    assert calls == [], "no scoring pass"
    beta = ru.load(_config(assets, tmp_path / "run2", [{**policies[0], "beta": 0.1}], ppo={"steps": 1}))
    learner_b = Learner(beta, actors.hosts, actors.workers, actors.worker_host)
    learner_b.evaluate(batch)
    assert calls == [len(batch.policies)], "beta > 0: one pass of reference rows only"


def test_a_reward_function_that_raises_stops_with_a_checkpoint(assets, tmp_path):
    from marl_ray.stages.ppo import run_ppo
    from marl_ray.train import checkpoint
    from marl_ray.train.rewards import RewardFunctionError

    rewards = [{"name": "boom", "function": f"{FNS}:explodes"}]
    policies = [{"name": "g", "reward": "boom", "algorithm": "grpo", "num_generations": 2, "lr": 1e-3,
                 "lora": {"r": 4, "alpha": 8}}]
    out = tmp_path / "run"
    cfg = ru.load(_config(assets, out, policies, rewards=rewards, run={"save_every": 0}))
    with pytest.raises(RewardFunctionError) as e:
        run_ppo(cfg)
    msg = str(e.value)
    assert "explodes" in msg and "step 1" in msg and "grader's server went away" in msg
    latest = checkpoint.resolve(out, "latest")
    assert str(latest) in msg
    _, state, _ = checkpoint.load(latest)
    assert state["step"] == 1 and [e["step"] for e in state["ledger"]] == [0]


@pytest.mark.parametrize("function,message", [
    ("nope_module_xyz:f", "rewards[0].function"),
    (f"{FNS}:no_such_fn", "has no 'no_such_fn'"),
    (f"{FNS}:STEPS", "not a function"),
])
def test_bad_reward_functions_are_refused_before_any_actor_starts(assets, tmp_path, function, message):
    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import check_inputs

    cfg = ru.load(_config(assets, tmp_path / "run", [{"name": "g", "reward": "f", "algorithm": "grpo",
                                                      "num_generations": 2}],
                          rewards=[{"name": "f", "function": function}]))
    with pytest.raises(ConfigError, match="rewards\\[0\\].function") as e:
        check_inputs(cfg)
    assert message in str(e.value)


def test_a_function_that_needs_a_column_the_data_lacks_is_refused(assets, tmp_path):
    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import check_inputs

    cfg = ru.load(_config({**assets, "prompts": str(ru.write_prompts(tmp_path / "p.jsonl", ru.PROMPTS))}, tmp_path / "run",
                          [{"name": "g", "reward": "answer", "algorithm": "rloo", "num_generations": 2}]))
    with pytest.raises(ConfigError, match="rewards\\[2\\].function.*answer"):
        check_inputs(cfg)


@pytest.mark.parametrize("policy,message", [
    ({"algorithm": "grpo"}, "policies[0].num_generations: grpo needs at least 2"),
    ({"algorithm": "sac"}, "policies[0].algorithm: 'sac' is not one of ppo, grpo, rloo, reinforce_pp"),
    ({"reward": ["rm", "nope"]}, "policies[0].reward: 'nope' is not one of the rewards"),
    ({"reward": ["vowels", "vowels"]}, "names a reward twice"),
    ({"reward": ["rm", "vowels"], "reward_weights": [1.0]}, "policies[0].reward_weights: 1 weights for 2 rewards"),
])
def test_bad_algorithm_settings_name_the_field(assets, tmp_path, policy, message):
    from marl_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        ru.load(_config(assets, tmp_path / "run", [{"name": "g", "reward": "rm", **policy}]))
    assert message in str(e.value)
