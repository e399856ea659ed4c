"""train/loop.py on its own (in-process runtime, no Ray): the phases of one step and what recovery
relies on, that a step redone from the same state is the same step."""

from __future__ import annotations

import pytest
import torch

import reliability_utils as ru


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    assets = ru.build_assets(tmp_path_factory.mktemp("loop_assets"))
    cfg = ru.load(ru.run_config(assets, tmp_path_factory.mktemp("loop_out"), generation={"max_new_tokens": 5}))
    actors = start_inprocess(cfg, seed=0)
    return Learner(cfg, actors.hosts, actors.workers, actors.worker_host)


def test_rollout_batch_layout(learner):
    cfg = learner.cfg
    batch = learner.rollout()
    n = cfg.ppo.batch_size * len(learner.policies)
    R = cfg.generation.max_new_tokens
    assert batch.input_ids.shape == (n, batch.response_start + R) and batch.response_mask.shape == (n, R)
    # every prompt is answered by every policy, policy by policy within a worker's share
    assert [batch.policies.count(p) for p in learner.policies] == [cfg.ppo.batch_size] * 2
    for i in range(0, n, 2):
        assert batch.prompt_ids[i] == batch.prompt_ids[i + 1] and batch.policies[i:i + 2] == ["up", "down"]
    # prompts are left-padded: the mask is a run of zeros then ones up to the response
    prompt_mask = batch.attention_mask[:, :batch.response_start]
    assert torch.equal(prompt_mask, prompt_mask.sort(1).values) and bool(prompt_mask[:, -1].all())
    assert batch.rollout is not None and batch.rollout.logprobs_BR.shape == (n, R)  # fp32: decode-step scores


def test_advantages_are_per_policy_and_flag_non_finite_rewards(learner):
    batch = learner.rollout()
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    assert set(adv) == {"up", "down"}
    for p, a in adv.items():
        assert a.rows == batch.rows(p) and a.finite
        assert torch.equal(a.raw_scores, ev.scores_B[a.rows])
        assert torch.equal(a.scores, a.raw_scores * learner.spec[p].reward_weight)
        real = a.mask.bool()
        assert abs(float(a.advantages[real].mean())) < 1e-5  # whitened
    ev.scores_B[batch.rows("down")[0]] = float("nan")
    bad = learner.advantages(batch, ev)
    assert bad["up"].finite and not bad["down"].finite
    before = {p: learner.hosts.checksums(p) for p in learner.policies}
    stats = learner.train(batch, ev, bad)
    assert learner.hosts.checksums("down") == before["down"], "a NaN reward must not reach the adapter"
    assert learner.hosts.checksums("up") != before["up"]
    assert stats["down"]["skipped/nonfinite"] == 1 and "loss/policy_avg" in stats["up"]


def test_a_step_redone_from_the_same_state_is_the_same_step(learner):
    """What recovery relies on: restore the learner, the workers, the hosts' RNG and the policies,
    run the step again, get the same metrics and the same weights, bit for bit."""
    state = learner.state()
    learner.hosts.snapshot(learner.step)  # the host keeps the policies' state
    first = learner.run_step()
    sums = {p: learner.hosts.checksums(p) for p in learner.policies}
    ledger = list(learner.ledger)
    learner.set_state(state)
    assert learner.hosts.restore(state["step"]) == []  # restored by the host itself, none refilled
    again = learner.run_step()
    assert {p: learner.hosts.checksums(p) for p in learner.policies} == sums
    assert learner.ledger == ledger and learner.step == state["step"] + 1
    for p in learner.policies:
        for k, v in first[p].items():
            if not k.startswith(("time/", "perf/")):
                assert again[p][k] == v, (p, k)


def test_an_epochs_order_deals_each_hosts_rows_in_turn():
    """Learner._order: one host (or rows without holders) = torch.randperm under the generator, as before;
    rows of two hosts are each shuffled and dealt in turn, so every run of 2k rows has k of each host."""
    import torch

    from marl_ray.train.loop import Batch, Learner

    def batch(holder):
        n = len(holder)
        z = torch.zeros((n, 2), dtype=torch.long)
        return Batch(z, z, z, 1, ["p"] * n, list(range(n)), holder=holder, kept=("t", 1) if holder else None)

    rows = list(range(8))
    for b in (batch([]), batch([0] * 8)):
        assert Learner._order(b, rows, torch.Generator().manual_seed(3)) == torch.randperm(
            8, generator=torch.Generator().manual_seed(3)).tolist()
    two = batch([0, 0, 0, 0, 1, 1, 1, 1])
    order = Learner._order(two, rows, torch.Generator().manual_seed(3))
    assert sorted(order) == rows
    assert [two.holder[rows[j]] for j in order] == [0, 1] * 4
    uneven = batch([0, 0, 0, 0, 0, 1, 1, 1])
    order = Learner._order(uneven, rows, torch.Generator().manual_seed(3))
    assert sorted(order) == rows and [uneven.holder[j] for j in order] == [0, 1, 0, 1, 0, 1, 0, 0]


def test_a_step_decodes_its_rows_once(tmp_path):
    """Reward functions, the gold metric and the sample log read one decode of the step's rows: one call to
    the rollout worker per step, prompts and completions together."""
    from pathlib import Path

    from marl_ray.metrics import MetricsLogger
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    assets = ru.build_assets(tmp_path / "assets")
    fns = Path(__file__).parent / "reward_fns" / "vowels.py"
    cfg = ru.run_config(assets, tmp_path / "out", run={"log_samples": 2})
    cfg["rewards"] = [{"name": "vowels", "function": f"{fns}:vowel_fraction"}]
    cfg["policies"] = [{**p, "reward": "vowels"} for p in cfg["policies"]]
    cfg = ru.load(cfg)
    actors = start_inprocess(cfg, seed=0)
    worker = actors.workers[0]._obj
    calls, decode = [], worker.decode
    worker.decode = lambda rows: calls.append(len(rows)) or decode(rows)
    gold = []
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host,
                      MetricsLogger(tmp_path / "out", tensorboard=False),
                      gold_fn=lambda texts: gold.append(list(texts)) or [1.0] * len(texts))
    learner.run_step()
    n = cfg.ppo.batch_size * len(learner.policies)
    assert calls == [n], calls  # the completions of every row; the prompts are texts already
    assert sum(len(g) for g in gold) == n
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * len(learner.policies)
