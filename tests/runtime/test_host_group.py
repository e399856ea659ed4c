"""runtime/host_group.py on its own, with real model hosts in this process (no Ray).

A group of two hosts must give what a group of one gives: the same scores row for row, and
the same update from a minibatch split over both (gradients summed) as from one host on the
whole of it; replicas stay identical; a non-finite update changes nothing; diverged replicas
are caught."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import reliability_utils as ru
from rows_utils import sent_rows
from marl_ray.runtime.handles import LocalHandle
from marl_ray.runtime.host_group import HostGroup, ReplicaDivergence, split


def test_split_is_contiguous_near_equal_and_drops_empty_shards():
    assert split(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split(2, 3) == [range(0, 1), range(1, 2)]
    assert split(0, 2) == []
    for n in range(12):
        for parts in range(1, 5):
            shards = split(n, parts)
            assert [i for r in shards for i in r] == list(range(n))
            assert max(map(len, shards), default=0) - min(map(len, shards), default=0) <= 1


def test_assign_gives_each_host_its_own_rows_first_and_lends_only_past_the_even_share():
    """HostGroup.assign: no host takes more than ceil(rows / hosts); within that it takes rows it keeps;
    rows past their holder's share are lent to the hosts with the fewest, one lend call per holder and
    taker (here the hosts are plain objects that record what they lend)."""

    class Holder:
        def __init__(self):
            self.lent = []

        def kept_rows(self, token, idx):
            self.lent.append(list(idx))
            return ("rows", tuple(idx))

    def assign(holder, rows=None):
        hosts = [Holder() for _ in range(max(holder) + 1 if rows is None else 3)]
        g = HostGroup([LocalHandle(h) for h in hosts], local=True)
        rows = list(range(len(holder))) if rows is None else rows
        index = [sum(1 for j in range(i) if holder[j] == holder[i]) for i in range(len(holder))]
        return g.assign("t", rows, holder, index), hosts

    shards, hosts = assign([0, 0, 0, 1, 1, 1])
    assert [s.own for s in shards] == [[0, 1, 2], [0, 1, 2]] and not any(h.lent for h in hosts)
    shards, _ = assign([0, 0, 1, 1, 1])  # 2 and 3 rows: within ceil(5 / 2) = 3, nothing lent
    assert [len(s.own) for s in shards] == [2, 3] and all(s.n_borrowed == 0 for s in shards)
    shards, hosts = assign([0, 0, 0, 0, 1, 1])  # 4 rows on host 0, share 3: one lent to host 1
    assert [s.own for s in shards] == [[0, 1, 2], [0, 1]] and shards[1].n_borrowed == 1
    assert hosts[0].lent == [[3]] and [len(s) for s in shards] == [3, 3]
    shards, hosts = assign([0] * 7, rows=list(range(7)))  # 7 rows on host 0 of 3 hosts: 3, 2, 2
    assert [len(s) for s in shards] == [3, 2, 2] and shards[0].own == [0, 1, 2]
    assert sorted(sum(hosts[0].lent, [])) == [3, 4, 5, 6] and len(hosts[0].lent) == 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two in-process hosts (replicas of the same seed) and a learner over the first one."""
    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    assets = ru.build_assets(tmp_path_factory.mktemp("group_assets"))
    cfg = ru.load(ru.run_config(assets, tmp_path_factory.mktemp("group_out"), generation={"max_new_tokens": 5}))
    actors = start_inprocess(cfg, seed=0)
    second = LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=1))
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    batch = learner.rollout()
    return {"cfg": cfg, "learner": learner, "batch": batch, "one": HostGroup(actors.hosts, local=True),
            "two": HostGroup([actors.hosts[0], second], local=True)}


def test_two_hosts_score_what_one_host_scores(setup):
    req = _req(setup["learner"], setup["batch"])
    one, two = setup["one"].evaluate(req), setup["two"].evaluate(req)
    for f in ("logprobs_BR", "ref_logprobs_BR", "values_BR", "scores_B", "entropy_BR"):
        assert getattr(two, f).shape == getattr(one, f).shape
        torch.testing.assert_close(getattr(two, f), getattr(one, f), atol=1e-5, rtol=1e-5, msg=lambda m: f"{f}: {m}")


def _update(group, learner, batch, ev, adv, policy, nan=False):
    local = list(range(len(adv[policy].rows)))
    total = float(adv[policy].mask[local].sum())
    shards = [sent_rows(learner, batch, ev, adv[policy], [local[i] for i in s]) for s in split(len(local), len(group))]
    if nan:
        shards[-1].advantages[:] = float("nan")
    pending = group.submit(policy, shards, total, learner.loss[policy], 1.0)
    return group.finish(policy, pending, 1.0)


def test_a_split_update_is_the_single_host_update_and_replicas_agree(setup):
    learner, batch, one, two = setup["learner"], setup["batch"], setup["one"], setup["two"]
    ev = one.evaluate(_req(learner, batch))
    adv = learner.advantages(batch, ev)
    policy = "up"
    start = one.hosts[0]._obj.get_state(policy)
    r1 = _update(one, learner, batch, ev, adv, policy)
    after_one = one.hosts[0]._obj.get_state(policy).weights
    two.set_state(policy, start)  # both replicas back to the start
    r2 = _update(two, learner, batch, ev, adv, policy)
    assert r1.applied and r2.applied
    for k in r1.stats:
        assert r2.stats[k] == pytest.approx(r1.stats[k], rel=1e-5, abs=1e-7), k
    sums = two.checksums(policy)
    assert sums[0] == sums[1]
    after_two = two.hosts[0]._obj.get_state(policy).weights
    moved = False
    for k, w in after_one.items():
        torch.testing.assert_close(after_two[k], w, rtol=1e-5, atol=1e-6)
        moved |= not torch.equal(w, start.weights[k])
    assert moved
    # a NaN in one host's shard: nothing applied anywhere, on a group of one or of two
    for group in (one, two):
        before = group.checksums(policy)
        result = _update(group, learner, batch, ev, adv, policy, nan=True)
        assert not result.applied and group.checksums(policy) == before


def test_diverged_replicas_are_caught_in_the_step_they_part(setup):
    """Replicas are compared once a step, by a fingerprint each host reduces where its tensors live: a
    replica changed before a step's updates fails that step (ReplicaDivergence naming the policy), and
    one changed bit of one tensor is enough."""
    from marl_ray.train.loop import Learner

    learner, batch, two = setup["learner"], setup["batch"], setup["two"]
    first, second = two.hosts[0]._obj, two.hosts[1]._obj
    for p in learner.policies:
        second.set_state(p, first.get_state(p))
    assert first.fingerprints(learner.policies) == second.fingerprints(learner.policies)
    cfg = setup["cfg"]
    both = Learner(cfg, two.hosts, learner.workers, [0] * len(learner.workers))
    ev = both.evaluate(batch)
    adv = both.advantages(batch, ev)
    tensor = next(iter(second.model.policy_state("down").values()))
    with torch.no_grad():
        flat = tensor.view(-1)
        flat[0] = torch.nextafter(flat[0], flat[0] + 1)  # one bit
    assert first.fingerprints(["up"]) == second.fingerprints(["up"])
    assert first.fingerprints(["down"]) != second.fingerprints(["down"])
    with pytest.raises(ReplicaDivergence, match="'down'.*step"):
        both.train(batch, ev, adv)
    with pytest.raises(ReplicaDivergence):
        two.agree(two.checksums("down"), "check")


def _req(learner, b):
    from marl_ray.runtime.protocol import EvalRequest

    return EvalRequest(b.input_ids, b.attention_mask, b.policies, [learner.adapter[p] for p in b.policies],
                       b.response_start, b.rollout)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_split_critic_free_update_is_the_single_host_update(tmp_path_factory, loss_type):
    """A grpo policy (no value head, k3 KL term): each loss type's minibatch of 9 completions split
    over two hosts (unequal shards: 5 and 4 rows) gives the single host's update."""
    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    assets = ru.build_assets(tmp_path_factory.mktemp("cf_group"))
    cfg = ru.load({**ru.run_config(assets, tmp_path_factory.mktemp("cf_out"), generation={"max_new_tokens": 5},
                                   ppo={"batch_size": 3, "mini_batch_size": 3}),
                   "policies": [{"name": "g", "reward": "rm", "algorithm": "grpo", "num_generations": 3,
                                 "beta": 0.1, "loss_type": loss_type, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}}]})
    actors = start_inprocess(cfg, seed=0)
    second = LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=1))
    one, two = HostGroup(actors.hosts, local=True), HostGroup([actors.hosts[0], second], local=True)
    learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host)
    assert "g" not in second._obj.model.value_heads
    batch = learner.rollout()
    ev = one.evaluate(_req(learner, batch))
    adv = learner.advantages(batch, ev)
    with torch.no_grad():  # move the policy off its start so that ratios differ from 1 and clipping happens
        for p in one.hosts[0]._obj.model.policy_state("g").values():
            p.add_(torch.randn_like(p) * 0.05)
    moved = one.hosts[0]._obj.get_state("g")
    results, weights = [], []
    for group in (one, two):
        group.set_state("g", moved)
        local = list(range(len(adv["g"].rows)))
        mask = adv["g"].mask[local]
        loss = dataclasses.replace(learner.loss["g"], n_seqs=int((mask.sum(1) > 0).sum()))
        shards = [sent_rows(learner, batch, ev, adv["g"], [local[i] for i in s]) for s in split(len(local), len(group))]
        results.append(group.finish("g", group.submit("g", shards, float(mask.sum()), loss, 1.0), 1.0))
        weights.append(group.hosts[0]._obj.get_state("g").weights)
    assert results[0].applied and results[1].applied
    for k in results[0].stats:
        assert results[1].stats[k] == pytest.approx(results[0].stats[k], rel=1e-5, abs=1e-7), k
    assert results[0].stats["policy/kl_k3"] > 0
    for k, w in weights[0].items():
        torch.testing.assert_close(weights[1][k], w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(w, moved.weights[k]) or "lora_A" in k


def test_sampling_groups_rows_by_policy_and_decodes_batch_rows_at_a_time(setup):
    """A host decodes each policy's rows side by side and returns them in the caller's order: rows
    interleaved by policy get what the same rows grouped by policy get, row for row. With
    generation.batch_rows = k the rows are decoded k at a time, chunk c under seed + c: the same as k-row
    calls of their own; the decode steps' scores stay those of the returned tokens."""
    host = setup["one"].hosts[0]._obj
    learner = setup["learner"]
    settings = dataclasses.replace(learner.sampling, scored=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 2
    mixed = ["up", "down"] * 3  # interleaved: row i under mixed[i]
    out = host.sample(prompts, mixed, settings, seed=11)
    order = [0, 2, 4, 1, 3, 5]  # the same rows, grouped (first-seen policy first)
    grouped = host.sample([prompts[i] for i in order], [mixed[i] for i in order], settings, seed=11)
    for pos, i in enumerate(order):
        assert torch.equal(out.responses[i], grouped.responses[pos]), i
        assert torch.equal(out.scores.logprobs_BR[i], grouped.scores.logprobs_BR[pos]), i
    chunked = host.sample(prompts, mixed, dataclasses.replace(settings, batch_rows=4), seed=11)
    first = host.sample([prompts[i] for i in order[:4]], [mixed[i] for i in order[:4]], settings, seed=11)
    rest = host.sample([prompts[i] for i in order[4:]], [mixed[i] for i in order[4:]], settings, seed=12)
    for pos, i in enumerate(order):
        part, j = (first, pos) if pos < 4 else (rest, pos - 4)
        assert torch.equal(chunked.responses[i], part.responses[j]), i
        for f in ("logprobs_BR", "values_BR", "entropy_BR"):
            assert torch.equal(getattr(chunked.scores, f)[i], getattr(part.scores, f)[j]), (f, i)
    assert not torch.equal(chunked.responses, out.responses)  # another seed per chunk: other samples


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A learner over two in-process hosts, each with its own rollout worker: each host keeps the rows it
    sampled (Batch.kept)."""
    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    assets = ru.build_assets(tmp_path_factory.mktemp("kept_assets"))
    cfg = ru.load(ru.run_config(assets, tmp_path_factory.mktemp("kept_out"), generation={"max_new_tokens": 5},
                                cluster={"rollout_workers": 2}))
    actors = start_inprocess(cfg, seed=0)
    second = LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=1))
    learner = Learner(cfg, [actors.hosts[0], second], actors.workers, [0, 1])
    return {"learner": learner, "batch": learner.rollout()}


def test_kept_rows_are_scored_where_they_were_sampled(kept):
    """Each host scores the rows it sampled (its own prompt padding): the same scores as the rows sent
    from the driver; the batch says which host keeps which row."""
    learner, batch = kept["learner"], kept["batch"]
    assert batch.kept is not None and sorted(set(batch.holder)) == [0, 1]
    assert batch.kept_workers == {0: [0], 1: [1]}
    for h in (0, 1):
        assert [batch.hold_index[i] for i in range(len(batch.holder)) if batch.holder[i] == h] == list(
            range(batch.holder.count(h)))
    ev = learner.evaluate(batch)
    sent = learner.evaluate(dataclasses.replace(batch, kept=None))
    for f in ev.FIELDS:
        torch.testing.assert_close(getattr(ev, f), getattr(sent, f), atol=1e-5, rtol=1e-5, msg=lambda m: f"{f}: {m}")


def test_an_update_from_kept_and_lent_rows_is_the_update_from_sent_rows(kept):
    """A minibatch by reference (KeptRows): rows a host keeps, and rows of the other host lent to it when
    its share is larger than what it keeps. The update (statistics and weights) is the one from the
    same rows sent as tensors."""
    from marl_ray.runtime.protocol import KeptRows

    learner, batch = kept["learner"], kept["batch"]
    group = learner.hosts
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    group.keep_advantages(learner.token, adv, batch.holder, batch.hold_index, batch.response_mask.shape)
    policy = "up"
    a = adv[policy]
    held0 = [j for j, i in enumerate(a.rows) if batch.holder[i] == 0]  # every row of the minibatch on host 0
    shards = group.assign(learner.token, [a.rows[j] for j in held0], batch.holder, batch.hold_index)
    assert all(isinstance(s, KeptRows) for s in shards) and len(shards) == 2
    assert len(shards[0]) == len(shards[1]) == len(held0) // 2
    assert shards[0].n_borrowed == 0 and shards[1].n_borrowed == len(held0) // 2 and not shards[1].own
    start = group.hosts[0]._obj.get_state(policy)
    mask = a.mask[held0]
    loss = dataclasses.replace(learner.loss[policy], n_seqs=int((mask.sum(1) > 0).sum()))
    by_ref = group.finish(policy, group.submit(policy, shards, float(mask.sum()), loss, 1.0), 1.0)
    w_ref = group.hosts[0]._obj.get_state(policy).weights
    group.set_state(policy, start)
    sent = [sent_rows(learner, batch, ev, a, [held0[i] for i in s]) for s in split(len(held0), 2)]
    by_value = group.finish(policy, group.submit(policy, sent, float(mask.sum()), loss, 1.0), 1.0)
    w_val = group.hosts[0]._obj.get_state(policy).weights
    group.set_state(policy, start)
    assert by_ref.applied and by_value.applied
    for k in by_value.stats:
        assert by_ref.stats[k] == pytest.approx(by_value.stats[k], rel=1e-5, abs=1e-7), k
    for k in w_val:
        torch.testing.assert_close(w_ref[k], w_val[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert len(set(group.checksums(policy))) == 1


def test_rows_a_host_no_longer_keeps_are_refused_by_name(kept):
    """A later rollout replaces the rows a host keeps: scoring the older batch is refused (RowsLost),
    never answered from the newer rows."""
    from marl_ray.runtime.host import RowsLost

    learner = kept["learner"]
    old = learner.rollout()
    learner.rollout()
    with pytest.raises(RowsLost, match="keeps no rows of rollout"):
        learner.evaluate(old)
    kept["batch"] = learner.rollout()


def test_a_host_that_lost_its_snapshot_is_refilled_from_a_peer(setup):
    """HostGroup.snapshot / restore: each host keeps the step's state itself; a host that comes back empty
    (a new process, as Ray restarts one) takes its peer's snapshot, the other restores its own. With no host
    holding the snapshot nothing changes and restore says so."""
    from marl_ray.runtime.host import ModelHost

    cfg, learner = setup["cfg"], setup["learner"]
    first = setup["two"].hosts[0]
    second = LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=1))
    for p in learner.policies:
        second._obj.set_state(p, first._obj.get_state(p))
    group = HostGroup([first, second], local=True)
    group.snapshot(7)
    want = {p: group.checksums(p) for p in learner.policies}
    fresh = LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=1))
    with torch.no_grad():  # host 0 moves on; host 1 is replaced by a process that holds nothing
        for t in first._obj.model.policy_state("up").values():
            t.add_(0.01)
    group = HostGroup([first, fresh], local=True)
    assert fresh._obj.snapshot_tags() == [] and group.checksums("up")[0] != want["up"][0]
    assert group.restore(7) == [1]  # host 1 refilled from host 0; host 0 from its own snapshot
    assert {p: group.checksums(p) for p in learner.policies} == want
    assert fresh._obj.snapshot_tags() == [7]
    alone = HostGroup([LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0))],
                      local=True)
    before = alone.checksums("up")
    assert alone.restore(7) is None and alone.checksums("up") == before



def test_a_snapshot_restored_twice_is_the_same_both_times(setup):
    """Restoring a snapshot leaves it as it was: the optimizer steps after a restore must not change the
    snapshot's tensors (a step redone twice restores the same state twice)."""
    host = setup["two"].hosts[0]._obj
    policy = "up"
    gen = torch.Generator().manual_seed(5)

    def step():
        grads = {k: torch.randn(p.shape, generator=gen) for k, p in host.model.policy_state(policy).items()}
        host.optim_step(policy, grads, None)

    step()  # the optimizer has moments to keep
    host.snapshot(11)
    want = (host.checksum(policy), copy_state(host.get_state(policy).optimizer))
    for _ in range(2):
        step()
        host.restore(11)
        assert host.checksum(policy) == want[0]
        got = host.get_state(policy).optimizer["state"]
        for i, s in want[1]["state"].items():
            for k, v in s.items():
                assert torch.equal(got[i][k], v), (i, k)


def copy_state(optimizer_state: dict) -> dict:
    import copy

    return copy.deepcopy(optimizer_state)
