"""The Ray runtime on a real two-node cluster on one machine (CPU, loopback, token auth on).

`ray.cluster_utils.Cluster` starts two raylets (num_cpus=1 each) bound to 127.0.0.1; the project's
own `start_actors` places one ModelHost per node (STRICT_SPREAD) and two rollout workers, and the
`Learner` trains two policies (a, b) for 3 steps. The tests then check placement, replica
identity after every step, that a gradient summed over two hosts' half-minibatches gives the
same step as one host on the whole minibatch, that only hosts hold base weights, that training
one policy through the host API leaves the other policy, the reward adapter and the base
bit-identical, and the prompt ledger. The deployment configs are validated here too.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings

import pytest
import torch

from rows_utils import sent_rows
from runtime_utils import REPO, listening_addresses, non_loopback, procs_with, tiny_assets, two_node_cluster

CONFIGS = sorted((REPO / "deployments" / "configs").glob("*.yaml"))


# --------------------------------------------------------------------------------- deployments
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_deployment_configs_validate(path):
    from marl_ray.config import PPORunConfig, load_config

    cfg = load_config(PPORunConfig, str(path))
    assert len(cfg.policies) >= 2, "the deployment configs train several policies on one base"
    if path.name == "local.yaml":
        assert [p.name for p in cfg.policies] == ["up", "down"]
        assert cfg.model.base == "runs/demo/sft/base" and cfg.rewards[0].path == "runs/demo/reward/adapter"
        assert cfg.cluster.host_num_gpus == 0 and cfg.model.quantization == "none"
    if path.name == "gpu.yaml":
        assert cfg.model.quantization == "4bit" and cfg.cluster.host_num_gpus == 1


def test_deployment_configs_present():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "gpu.yaml"}


def test_deployment_manifests_parse():
    """rayjob.yaml, cluster.yaml, runtime_env.yaml: valid YAML with token auth and the `marl_ray rl` entrypoint."""
    import subprocess

    import yaml

    dep = REPO / "deployments"
    job = yaml.safe_load((dep / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"] == "python -m marl_ray rl --config deployments/configs/gpu.yaml"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["pip"]["packages"] and "env_vars" in env
    cluster_spec = job["spec"]["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in cluster_spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups and all(g["rayStartParams"]["num-gpus"] == "1" for g in gpu_groups)

    launcher = yaml.safe_load((dep / "cluster.yaml").read_text())
    head_cmd = " ".join(launcher["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert "RAY_AUTH_MODE=token" in " ".join(launcher["worker_start_ray_commands"])

    runtime_env = yaml.safe_load((dep / "runtime_env.yaml").read_text())
    assert runtime_env["pip"]["packages"] and runtime_env["env_vars"]
    r = subprocess.run(["bash", "-n", str(dep / "local_head.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two raylets on 127.0.0.1 (one CPU each), token auth on, a private temp dir; the driver connected."""
    with two_node_cluster(tmp_path_factory.mktemp("auth")) as c:
        yield c


def _checksums(hosts, policy):
    import ray

    return ray.get([h.checksum.remote(policy) for h in hosts])


def _frozen_sums(hosts):
    """(reward adapter checksum, base checksum) per host."""
    import ray

    return ray.get([h.role_checksum.remote("rm") for h in hosts]), ray.get([h.base_checksum.remote() for h in hosts])


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    """Hosts, workers and a Learner on the two-node cluster, after 3 PPO steps of policies a and b."""
    import ray

    from marl_ray.runtime.placement import shutdown_actors, start_actors
    from marl_ray.config import PPORunConfig, load_config
    from marl_ray.train.loop import Learner

    assets = tiny_assets(tmp_path_factory.mktemp("runtime_assets"))
    cfg = load_config(PPORunConfig, base={
        "model": {"base": assets["base"]},
        "rewards": [{"name": "rm", "path": assets["reward"]}],
        "policies": [{"name": "a", "reward": "rm", "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
                     {"name": "b", "reward": "rm", "reward_weight": -1.0, "lr": 1e-3, "lora": {"r": 4, "alpha": 8}}],
        "generation": {"max_new_tokens": 6},
        "ppo": {"steps": 3, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"rollout_workers": 2, "host_num_cpus": 1},
        "data": {"prompts": assets["prompts"]},
        "run": {"out_dir": str(tmp_path_factory.mktemp("runtime_out")), "tensorboard": False, "progress": False},
    })
    driver_bytes0 = _tensor_bytes_here()  # whatever this process held before (other tests, the assets)
    actors = start_actors(cfg, seed=cfg.run.seed)
    hosts, workers, placement = actors.hosts, actors.workers, actors
    extra = []
    try:
        infos = ray.get([h.info.remote() for h in hosts])
        learner = Learner(cfg, hosts, workers, actors.worker_host, host_nodes=actors.host_nodes,
                          respawn_worker=actors.respawn_worker)
        frozen_before = _frozen_sums(hosts)
        start = learner.checksums()
        per_step = []
        learner.fit(on_step=lambda step, metrics: per_step.append((step, learner.checksums(), metrics)))
        yield {"cfg": cfg, "hosts": hosts, "workers": workers, "placement": placement, "infos": infos,
               "learner": learner, "start": start, "per_step": per_step, "frozen_before": frozen_before,
               "frozen_after": _frozen_sums(hosts), "worker_states": ray.get([w.state.remote() for w in workers]),
               "extra": extra, "assets": assets, "driver_bytes0": driver_bytes0}
    finally:
        shutdown_actors(workers + hosts + extra, placement.pg)


def test_cluster_binds_loopback_only(cluster, run):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    procs = procs_with(cluster["temp_dir"])
    assert len(procs) >= 6, "expected the gcs, two raylets and their workers"
    listening = listening_addresses(procs)
    assert listening
    assert not non_loopback(listening), f"Ray processes listening beyond loopback: {non_loopback(listening)}"
    # the model hosts, with their collective group formed (host 0 serves its rendezvous store; gloo's sockets)
    import psutil

    assert run["learner"].hosts.members is not None
    hosts = listening_addresses([psutil.Process(i["pid"]) for i in run["infos"]])
    assert hosts.get(run["infos"][0]["pid"]), "host 0 serves the group's rendezvous"
    assert not non_loopback(hosts), f"model hosts listening beyond loopback: {non_loopback(hosts)}"


def test_one_host_per_node_and_identical_replicas_after_every_step(run):
    import ray

    infos = run["infos"]
    node_ids = [i["node_id"] for i in infos]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(infos) == 2 and len(set(node_ids)) == 2 and set(node_ids) == alive
    assert node_ids == run["placement"].host_nodes
    assert len({i["pid"] for i in infos}) == 2
    assert len({i["fingerprint"] for i in infos}) == 1
    # Replicas start identical and stay identical after every step (the Learner also raises
    # ReplicaDivergence on any mismatch after each optimizer step).
    for p in ("a", "b"):
        assert len(set(run["start"][p])) == 1
    assert [s for s, _, _ in run["per_step"]] == [0, 1, 2]
    seen = {p: [run["start"][p][0]] for p in ("a", "b")}
    for step, sums, metrics in run["per_step"]:
        assert set(metrics) == {"a", "b"}
        for p in ("a", "b"):
            assert len(sums[p]) == 2 and sums[p][0] == sums[p][1], f"step {step} policy {p}: {sums[p]}"
            assert sums[p][0] != seen[p][-1], f"policy {p} did not change at step {step}"
            seen[p].append(sums[p][0])
    # Training policies never touches the reward adapter or the base.
    assert run["frozen_before"] == run["frozen_after"]
    rm, base = run["frozen_after"]
    assert len(set(rm)) == 1 and len(set(base)) == 1


def _minibatch(learner, batch, ev, adv, policy, local):
    return sent_rows(learner, batch, ev, adv[policy], local)


def _loss_cfg(cfg, micro_batch_size=None):
    from marl_ray.runtime.protocol import LossSettings

    g = cfg.ppo
    return LossSettings(g.cliprange, g.cliprange_value, g.vf_coef, micro_batch_size)


def _sharded_grads(learner, hosts, batch, ev, adv, policy, local, cfg, micro_batch_size=None):
    """Each host's share of the minibatch `local` (contiguous split, as the Learner does); grads summed."""
    import ray

    from marl_ray.runtime.host_group import split

    total = float(adv[policy].mask[local].sum().clamp(min=1))
    refs = [h.forward_backward.remote(policy, _minibatch(learner, batch, ev, adv, policy, [local[i] for i in shard]),
                                      total, _loss_cfg(cfg, micro_batch_size))
            for h, shard in zip(hosts, split(len(local), len(hosts)))]
    results = ray.get(refs)
    grads = {k: sum(r.grads[k] for r in results) for k in results[0].grads}
    stats = {k: sum(r.stats[k] for r in results) for k in results[0].stats}
    return grads, stats


def test_sharded_gradient_step_equals_single_host_step(run):
    """Two hosts on half a minibatch each, grads summed, one optimizer step on both == one host doing
    forward_backward on the whole minibatch and the same optimizer step."""
    import ray

    from marl_ray.runtime.host import ModelHost

    cfg, hosts, learner = run["cfg"], run["hosts"], run["learner"]
    solo = ray.remote(ModelHost).options(num_cpus=0, max_concurrency=1).remote(
        cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=cfg.run.seed, torch_threads=1, host_index=2)
    run["extra"].append(solo)
    policy = "a"
    # The single host takes over the replicas' current weights and optimizer state.
    state = ray.get(hosts[0].get_state.remote(policy))
    assert ray.get(solo.set_state.remote(policy, state)) == _checksums(hosts, policy)[0]

    batch = learner.rollout()
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    local = list(range(len(adv[policy].rows)))  # the whole rollout batch of `a` as one minibatch
    assert len(local) == cfg.ppo.batch_size

    summed, stats2 = _sharded_grads(learner, hosts, batch, ev, adv, policy, local, cfg)
    whole, stats1 = _sharded_grads(learner, [solo], batch, ev, adv, policy, local, cfg)
    assert set(summed) == set(whole)
    assert sum(float(g.norm()) for g in whole.values()) > 0
    for k in whole:
        torch.testing.assert_close(summed[k], whole[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"grad {k}: {m}")
    for k in stats1:
        assert stats2[k] == pytest.approx(stats1[k], rel=1e-5, abs=1e-7), k
    # ppo.micro_batch_size also chunks the scoring pass: the same scores, 3 rows at a time
    from dataclasses import replace as _replace

    from marl_ray.runtime.protocol import EvalRequest

    req = EvalRequest(batch.input_ids, batch.attention_mask, batch.policies,
                      [learner.adapter[p] for p in batch.policies], batch.response_start)
    one, chunked = ray.get([solo.evaluate.remote(req), solo.evaluate.remote(_replace(req, chunk=3))])
    for f in ("logprobs_BR", "ref_logprobs_BR", "values_BR", "scores_B", "entropy_BR"):
        torch.testing.assert_close(getattr(chunked, f), getattr(one, f), rtol=1e-5, atol=1e-6, equal_nan=True)
    # ppo.micro_batch_size: the same shard in chunks of 3 rows (the last one shorter), gradients summed
    micro, stats3 = _sharded_grads(learner, [solo], batch, ev, adv, policy, local, cfg, micro_batch_size=3)
    for k in whole:
        torch.testing.assert_close(micro[k], whole[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"micro grad {k}: {m}")
    for k in stats1:
        assert stats3[k] == pytest.approx(stats1[k], rel=1e-5, abs=1e-7), k

    ray.get([h.optim_step.remote(policy, ray.put(summed), cfg.ppo.max_grad_norm) for h in hosts])
    assert _checksums(hosts, policy)[0] == _checksums(hosts, policy)[1]
    ray.get(solo.optim_step.remote(policy, whole, cfg.ppo.max_grad_norm))
    after = [ray.get(h.get_state.remote(policy)).weights for h in (hosts[0], solo)]
    print("max |grad diff| %.3g, max |weight diff| %.3g" % (
        max(float((summed[k] - whole[k]).abs().max()) for k in whole),
        max(float((w - after[1][k]).abs().max()) for k, w in after[0].items())))
    changed = False
    for k, w in after[0].items():
        torch.testing.assert_close(w, after[1][k], rtol=1e-5, atol=1e-6, msg=lambda m: f"weight {k}: {m}")
        changed |= not torch.equal(w, state.weights[k])
    assert changed, "the optimizer step changed nothing"
    # Not bit-identical in general (the two hosts sum in another order), so the solo host may differ
    # from the replicas; the replicas themselves are bit-identical.

    # train_minibatch (what a learner with one host calls) == forward_backward + optim_step, bit for bit
    start = ray.get(solo.get_state.remote(policy))
    mb = _minibatch(learner, batch, ev, adv, policy, local)
    total = float(adv[policy].mask[local].sum())
    fused_result = ray.get(solo.train_minibatch.remote(policy, mb, total, _loss_cfg(cfg), cfg.ppo.max_grad_norm))
    stats_fused, applied = fused_result.stats, fused_result.applied
    fused = ray.get(solo.get_state.remote(policy))
    ray.get(solo.set_state.remote(policy, start))
    split_result = ray.get(solo.forward_backward.remote(policy, mb, total, _loss_cfg(cfg)))
    grads, stats_split = split_result.grads, split_result.stats
    ray.get(solo.optim_step.remote(policy, grads, cfg.ppo.max_grad_norm))
    split = ray.get(solo.get_state.remote(policy))
    assert applied and stats_fused == stats_split
    for k in split.weights:
        assert torch.equal(fused.weights[k], split.weights[k]), k
        assert not torch.equal(fused.weights[k], start.weights[k]) or "lora_A" in k
    # a non-finite gradient: nothing is applied, weights and optimizer state stay as they were
    before = ray.get(solo.checksum.remote(policy))
    bad = dataclasses.replace(mb, advantages=torch.full_like(mb.advantages, float("nan")))
    applied = ray.get(solo.train_minibatch.remote(policy, bad, total, _loss_cfg(cfg), cfg.ppo.max_grad_norm)).applied
    assert not applied and ray.get(solo.checksum.remote(policy)) == before
    after_bad = ray.get(solo.get_state.remote(policy)).optimizer["state"]
    assert after_bad.keys() == split.optimizer["state"].keys()
    for i, st in after_bad.items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(split.optimizer["state"][i][name])), (i, name)


def _group_update(group, learner, batch, ev, adv, policy, local):
    """One minibatch update of `policy` on rows `local` through a HostGroup (as Learner.train does)."""
    from marl_ray.runtime.host_group import split

    mask = adv[policy].mask[local]
    loss = dataclasses.replace(learner.loss[policy], n_seqs=int((mask.sum(1) > 0).sum()))
    shards = [_minibatch(learner, batch, ev, adv, policy, [local[i] for i in s]) for s in split(len(local), len(group))]
    return group.finish(policy, group.submit(policy, shards, float(mask.sum()), loss, 1.0), 1.0)


def test_collective_step_equals_single_host_step(run):
    """The learner's run summed its updates among the hosts (a gloo group on 127.0.0.1, formed once).
    One update of `a` on a minibatch of 3 rows (shards of 2 and 1): allreduced among the two hosts ==
    allreduced among three hosts (a third host, no CPU reserved, on one of the nodes) == one host on
    all rows; 2 rows on 3 hosts (one host without rows) == one host; the driver received only
    statistics (no gradients: fewer bytes than one adapter); bf16 gradient traffic moves the update by
    a bounded amount against fp32, and replicas stay identical on every path."""
    import ray

    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.host_group import GradSync, HostGroup, Traffic

    cfg, hosts, learner = run["cfg"], run["hosts"], run["learner"]
    group = learner.hosts
    assert group.collective and group.sync == GradSync() and group.generation >= 1
    assert [m[0] for m in group.members] == [i["pid"] for i in run["infos"]]
    solo, third = (ray.remote(ModelHost).options(num_cpus=0, max_concurrency=1).remote(
        cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=cfg.run.seed, torch_threads=1, host_index=i)
        for i in (2, 3))
    run["extra"] += [solo, third]
    policy = "a"
    start = ray.get(hosts[0].get_state.remote(policy))
    batch = learner.rollout()
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    local = [2, 0, 3]
    paths = {"collective": group,
             "bf16": HostGroup(hosts, sync=GradSync(comm_dtype="bf16", bucket_mb=1e-3)),  # a bucket per tensor
             "three hosts": HostGroup([hosts[0], hosts[1], third]),  # world 3: a row each
             "one host": HostGroup([solo])}
    weights, results, traffic = {}, {}, {}
    for name, g in paths.items():
        g.set_state(policy, start)
        g.traffic = Traffic()
        results[name] = _group_update(g, learner, batch, ev, adv, policy, local)
        traffic[name] = g.traffic
        weights[name] = ray.get(g.hosts[0].get_state.remote(policy)).weights
        assert results[name].applied, name
        assert len(set(g.checksums(policy))) == 1, name
    for name in ("three hosts", "one host"):
        for k in results[name].stats:
            assert results["collective"].stats[k] == pytest.approx(results[name].stats[k], rel=1e-5, abs=1e-7), k
        for k, w in weights[name].items():
            torch.testing.assert_close(weights["collective"][k], w, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {k}: {m}")
    grad_bytes = sum(w.numel() * 4 for w in start.weights.values())
    assert traffic["collective"].received < min(3000, grad_bytes) and "received/grads" not in traffic["collective"].by_kind
    assert "sent/summed_grads" not in traffic["collective"].by_kind
    # bf16 traffic against fp32: the update (new - start) differs by at most 2% of its largest entry
    upd = {k: weights["collective"][k] - start.weights[k] for k in start.weights}
    scale = max(float(u.abs().max()) for u in upd.values())
    err = max(float((weights["bf16"][k] - start.weights[k] - u).abs().max()) for k, u in upd.items())
    print(f"bf16 vs fp32 allreduce: max |update diff| {err:.3g} of max |update| {scale:.3g}; driver bytes "
          f"collective {traffic['collective'].total}, one host {traffic['one host'].total}")
    assert scale > 0 and err <= 0.02 * scale, (err, scale)
    # fewer rows than hosts: the third host adds zeros and still takes part in the sums and the step
    three, two_rows = paths["three hosts"], [1, 3]
    for g in (three, paths["one host"]):
        g.set_state(policy, start)
        assert _group_update(g, learner, batch, ev, adv, policy, two_rows).applied
    assert len(set(three.checksums(policy))) == 1
    w3, w1 = (ray.get(g.hosts[0].get_state.remote(policy)).weights for g in (three, paths["one host"]))
    for k, w in w1.items():
        torch.testing.assert_close(w3[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"2 rows on 3 hosts {k}: {m}")
    for g in paths.values():  # back to where the run left the replicas (the learner's group re-forms on use)
        g.set_state(policy, start)


def test_a_collective_without_its_peer_times_out(run):
    """Host 0 enters an allreduce host 1 never joins: it fails after the group's timeout (no hang), and
    the learner's group is formed again on its next use."""
    import time

    import ray

    from marl_ray.runtime.host_group import GradSync, HostGroup

    hosts, learner = run["hosts"], run["learner"]
    g = HostGroup(hosts, sync=GradSync(timeout_s=3.0))
    g.form()
    batch = learner.rollout()
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    mb = _minibatch(learner, batch, ev, adv, "a", [0, 1])
    before = _checksums(hosts, "a")
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="(?i)timed out|timeout"):
        ray.get(hosts[0].train_collective.remote("a", mb, float(mb.mask.sum()), learner.loss["a"], 1.0, g.generation),
                timeout=60)
    waited = time.monotonic() - t0
    assert waited < 30, waited
    assert _checksums(hosts, "a") == before
    old = learner.hosts.generation
    learner.hosts.ensure_group()  # the hosts are in g's group now: the learner forms its own again
    assert learner.hosts.generation not in (old, g.generation)


def test_rows_stay_on_their_hosts_and_the_driver_sends_references(run):
    """Each host keeps the rows its rollout worker sampled, scores them there and trains on them: per
    minibatch the driver sends each host row indices and references (KeptRows), a fraction of the rows'
    tensors, and receives statistics and fingerprints only. A host whose share is more than it keeps
    gets rows lent by the other host: a reference owned by the lender, fetched host to host (the driver
    never fetches it); the update is the one from the same rows sent as tensors."""
    import ray

    from marl_ray.runtime.host_group import Traffic, split
    from marl_ray.runtime.protocol import KeptRows

    learner, hosts = run["learner"], run["hosts"]
    group = learner.hosts
    start = {p: ray.get(hosts[0].get_state.remote(p)) for p in learner.policies}
    batch = learner.rollout()
    assert batch.kept is not None and sorted(set(batch.holder)) == [0, 1]
    group.traffic = Traffic()
    ev = learner.evaluate(batch)
    adv = learner.advantages(batch, ev)
    stats_ref = learner.train(batch, ev, adv)
    by_ref = group.traffic
    assert all(stats_ref[p] for p in learner.policies)
    # the same rows as tensors, each once per epoch, is what the driver would send without the hosts keeping them
    by_val = Traffic()
    for p in learner.policies:
        for _ in range(learner.cfg.ppo.ppo_epochs):
            by_val.add("rows", sent_rows(learner, batch, ev, adv[p], list(range(len(adv[p].rows)))), "sent")
    sent_ref, sent_val = by_ref.by_kind["sent/rows"], by_val.by_kind["sent/rows"]
    print(f"per step: rows sent as references {sent_ref} B, as tensors {sent_val} B; advantages sent once "
          f"{by_ref.by_kind['sent/advantages']} B; scoring requests {by_ref.by_kind['sent/score']} B")
    assert sent_ref * 4 < sent_val, (sent_ref, sent_val)
    assert {k for k in by_ref.by_kind if k.startswith("received/")} == {"received/scores", "received/result",
                                                                          "received/fingerprints"}

    # a minibatch of rows host 0 keeps: host 1 takes half of them, lent by host 0
    policy = "a"
    group.set_state(policy, start[policy])
    a = adv[policy]
    local = [j for j, i in enumerate(a.rows) if batch.holder[i] == 0]
    group.keep_advantages(learner.token, adv, batch.holder, batch.hold_index, batch.response_mask.shape)
    shards = group.assign(learner.token, [a.rows[j] for j in local], batch.holder, batch.hold_index)
    assert isinstance(shards[1], KeptRows) and not shards[1].own and shards[1].n_borrowed == len(local) // 2
    assert all(isinstance(r, ray.ObjectRef) for r in shards[1].borrowed)
    mask = a.mask[local]
    loss = dataclasses.replace(learner.loss[policy], n_seqs=int((mask.sum(1) > 0).sum()))
    lent = group.finish(policy, group.submit(policy, shards, float(mask.sum()), loss, 1.0), 1.0)
    w_lent = ray.get(hosts[0].get_state.remote(policy)).weights
    group.set_state(policy, start[policy])
    sent = [sent_rows(learner, batch, ev, a, [local[i] for i in s]) for s in split(len(local), 2)]
    direct = group.finish(policy, group.submit(policy, sent, float(mask.sum()), loss, 1.0), 1.0)
    w_direct = ray.get(hosts[0].get_state.remote(policy)).weights
    assert lent.applied and direct.applied
    for k, w in w_direct.items():
        torch.testing.assert_close(w_lent[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"lent rows {k}: {m}")
    group.traffic = None
    for p in learner.policies:
        group.set_state(p, start[p])


def test_rollout_logprobs_stand_in_for_the_policy_pass(run):
    """ppo.rollout_logprobs (null: on for this fp32 base): the batch carries the decode steps' policy
    logprobs, values and entropies (both hosts' rollouts); evaluate takes them as they are, with no
    policy rows in its pass, and they are what the policy pass gives, to rounding. Off: not there."""
    import dataclasses

    learner = run["learner"]
    assert run["cfg"].ppo.rollout_logprobs is None and learner.sampling.scored
    batch = learner.rollout()
    rollout = batch.rollout
    assert rollout is not None
    fields = ("logprobs_BR", "values_BR", "entropy_BR")
    assert all(getattr(rollout, k).shape == batch.response_mask.shape for k in fields)
    ev = learner.evaluate(batch)
    full = learner.evaluate(dataclasses.replace(batch, rollout=None))
    real = batch.response_mask.bool()
    for k in fields:
        v = getattr(rollout, k)
        assert torch.equal(getattr(ev, k), v), k
        torch.testing.assert_close(v[real], getattr(full, k)[real], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    for k in ("ref_logprobs_BR", "scores_B"):
        torch.testing.assert_close(getattr(ev, k), getattr(full, k), atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")
    scored = learner.sampling
    learner.sampling = dataclasses.replace(scored, scored=False)
    try:
        assert learner.rollout().rollout is None
    finally:
        learner.sampling = scored


def _tensor_bytes_here() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_only_hosts_hold_base_weights(run):
    import ray

    infos = ray.get([h.info.remote() for h in run["hosts"]])
    for info in infos:
        assert info["base_copies"] == 1
        assert info["pid"] != os.getpid()
    base_bytes = infos[0]["base_params"] * 4  # fp32 base ("none" quantization)
    assert base_bytes > 500_000
    worker_bytes = ray.get([w.tensor_bytes.remote() for w in run["workers"]])
    assert all(b < base_bytes / 20 for b in worker_bytes), (worker_bytes, base_bytes)
    # The driver is the learner process: running it added no more than batches and metrics.
    driver_bytes = _tensor_bytes_here() - run["driver_bytes0"]
    assert driver_bytes < base_bytes / 20, (driver_bytes, base_bytes)
    print(f"base {base_bytes} B; rollout workers {worker_bytes} B; driver +{driver_bytes} B")


def test_training_one_policy_leaves_the_others_bit_identical(run):
    """Train only `a` through the host API (forward_backward on each host's share, summed grads,
    optim_step everywhere): `b`, the reward adapter and the base do not change by a single bit."""
    import ray

    cfg, hosts, learner = run["cfg"], run["hosts"], run["learner"]
    a0, b0 = _checksums(hosts, "a"), _checksums(hosts, "b")
    rm0, base0 = _frozen_sums(hosts)
    b_state0 = ray.get(hosts[0].get_state.remote("b"))
    for _ in range(2):
        batch = learner.rollout()
        ev = learner.evaluate(batch)
        adv = learner.advantages(batch, ev)
        for start in range(0, cfg.ppo.batch_size, cfg.ppo.mini_batch_size):
            local = list(range(start, start + cfg.ppo.mini_batch_size))
            grads, _ = _sharded_grads(learner, hosts, batch, ev, adv, "a", local, cfg)
            ray.get([h.optim_step.remote("a", ray.put(grads), cfg.ppo.max_grad_norm) for h in hosts])
            sums = _checksums(hosts, "a")
            assert sums[0] == sums[1]
    a1, b1 = _checksums(hosts, "a"), _checksums(hosts, "b")
    rm1, base1 = _frozen_sums(hosts)
    assert a1[0] == a1[1] and a1 != a0
    assert b1 == b0
    assert rm1 == rm0 and base1 == base0
    b_state1 = ray.get(hosts[0].get_state.remote("b"))
    for k, v in b_state0.weights.items():
        assert torch.equal(v, b_state1.weights[k]), k
    assert _optimizer_steps(b_state1) == _optimizer_steps(b_state0)


def _optimizer_steps(state) -> list:
    return [float(s["step"]) for s in state.optimizer["state"].values()]


def test_prompt_ledger_one_shard_epoch_without_repeats(run):
    """12 prompts, 2 workers (6 each), 4 prompts a step: 3 steps use every prompt exactly once."""
    ledger = run["learner"].ledger
    assert [e["step"] for e in ledger] == [0, 1, 2]
    ids = [i for e in ledger for i in e["prompt_ids"]]
    assert all(len(e["prompt_ids"]) == run["cfg"].ppo.batch_size for e in ledger)
    assert len(ids) == len(set(ids)), f"a prompt was used twice within the shard epoch: {ledger}"
    assert set(ids) == set(range(12))
    assert run["worker_states"] == [{"position": 6, "epoch": 0}] * 2


def test_a_restarted_host_rejoins_the_group_and_the_step_is_redone_exactly(run, monkeypatch):
    """Last (it moves the run on): two more steps of the learner, uninterrupted, then the same two steps
    again from the same state with host 1 killed (SIGKILL, by pid) after the first step and again
    mid-update of the second, as it enters its allreduce (a fault armed at its "allreduce" point,
    runtime/faults.py), its peer inside the allreduce or about to enter it. The peer fails at once
    (no hang until the collective's timeout), Ray restarts host 1, the learner restores both hosts,
    forms the group anew and redoes the step: checksums, metrics and ledger equal the uninterrupted
    steps', bit for bit."""
    import signal
    import time

    from marl_ray.runtime.handles import get
    from marl_ray.train.loop import Learner

    learner = run["learner"]
    start = learner.save_checkpoint()
    s0 = learner.step
    learner.fit(steps=2)
    want = {"sums": learner.checksums(), "metrics": learner.history[-2:], "ledger": learner.ledger[-2:]}
    generation = learner.hosts.generation
    learner.load_checkpoint(str(start))  # every actor and the learner back to the state before those steps
    assert learner.step == s0 and learner.recoveries == 0

    killed, tries = [], {}

    def kill_host1():
        pid = get(learner.hosts[1].pid.remote())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    real_train = Learner.train

    def train(self, *args):
        tries[self.step] = tries.get(self.step, 0) + 1
        if self.step == s0 + 1 and tries[self.step] == 1:  # mid-update: host 1 dies as it enters its allreduce
            killed.append(get(self.hosts[1].pid.remote()))
            get(self.hosts[1].arm_fault.remote("allreduce"))
        return real_train(self, *args)

    monkeypatch.setattr(Learner, "train", train)
    t0 = time.monotonic()
    learner.fit(steps=2, on_step=lambda step, m: kill_host1() if step == s0 else None)
    elapsed = time.monotonic() - t0
    assert len(killed) == 2 and learner.recoveries >= 2, (killed, learner.recoveries)
    assert elapsed < 0.5 * learner.hosts.sync.timeout_s, elapsed  # nobody waited for a collective's timeout
    assert learner.hosts.generation > generation and learner.hosts.members[1][0] not in killed
    assert learner.checksums() == want["sums"]
    assert learner.ledger[-2:] == want["ledger"]
    for got, exp in zip(learner.history[-2:], want["metrics"]):
        assert got["step"] == exp["step"]
        for p, m in exp["metrics"].items():
            for k, v in m.items():
                if not k.startswith(("time/", "perf/")):
                    assert got["metrics"][p][k] == v, (exp["step"], p, k)
