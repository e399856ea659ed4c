"""A node gone for good in a two-node cluster (`ray.cluster_utils.Cluster` on 127.0.0.1).

The second node (its model host and its rollout worker) is removed after step 0 (which summed its
gradients among the two hosts, host to host). With the number
of hosts following the nodes (cluster.num_hosts: null), the run goes on with the host left: the
lost worker is started anew on the node left and resumes its shard of the stream, so no prompt
is lost or used twice. With a fixed number of hosts, the run stops with a checkpoint of the last
good state and an error that names the lost node. Checkpoints and the final export go to
`run.storage` (a path both nodes reach), written by the hosts themselves: by the host left after
the loss."""

from __future__ import annotations

import logging

import pytest

import reliability_utils as ru
from runtime_utils import two_node_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ru.build_assets(tmp_path_factory.mktemp("node_loss_assets"))


def _wait_until_gone(learner, node_id: str, timeout_s: float = 60.0):
    """Until the cluster reports the node dead and its host no longer answers. Without this, on an idle
    machine its processes can outlive their raylet long enough for the last steps to run on them, and the
    loss surfaces only after training, where the run's end (the final checkpoint and export) is not under
    recovery."""
    import time

    import ray

    from marl_ray.runtime.placement import alive_node_ids

    lost = [h for h, n in zip(learner.hosts.hosts, learner.host_nodes) if n == node_id]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node_id not in alive_node_ids():
            try:
                ray.get([h.pid.remote() for h in lost], timeout=5)
            except Exception:  # noqa: BLE001  (dead or unreachable: what the test needs)
                return
        time.sleep(0.2)
    raise AssertionError(f"node {node_id} was removed but its host still answers after {timeout_s:.0f}s")


def _run(assets, out, num_hosts, tmp_path, caplog):
    from marl_ray.stages.ppo import run_ppo

    cfg = ru.load(ru.run_config(assets, out, cluster={"runtime": "ray", "num_hosts": num_hosts, "max_restarts": 1,
                                                      "rollout_workers": 2, "host_num_cpus": 1},
                                run={"save_every": 0, "storage": str(tmp_path / "store")}))
    seen = {}
    with two_node_cluster(tmp_path / "auth") as c:
        head, other = c["cluster"].head_node, [n for n in c["cluster"].list_all_nodes() if not n.is_head()][0]

        def on_start(learner):
            seen["nodes"] = list(learner.host_nodes)
            seen["learner"] = learner

        def on_step(step, metrics):
            if step == 0:  # step 0 summed its gradients among the two hosts (their collective group)
                group = seen["learner"].hosts
                seen["collective"] = group.collective and group.members is not None and len(group) == 2
                seen["lost"] = other.node_id
                c["cluster"].remove_node(other, allow_graceful=False)
                _wait_until_gone(seen["learner"], other.node_id)

        with caplog.at_level(logging.WARNING, logger="marl_ray.train"):
            try:
                return run_ppo(cfg, on_start=on_start, on_step=on_step), seen, head
            except Exception as e:  # noqa: BLE001  (the test looks at it)
                return e, seen, head


def test_a_lost_node_shrinks_the_group_and_the_run_goes_on(assets, tmp_path, caplog):
    out = tmp_path / "run"
    summary, seen, head = _run(assets, out, None, tmp_path, caplog)
    assert not isinstance(summary, Exception), summary
    assert seen["lost"] in seen["nodes"] and len(seen["nodes"]) == 2 and seen["collective"]
    assert summary["steps"] == 4 and summary["recoveries"] >= 1
    assert [h["node_id"] for h in summary["hosts"]] == [head.node_id]
    assert "gone for good" in caplog.text
    ru.assert_ledger_clean(summary["ledger"], 4, 4)
    # the policies trained on: the host left holds every policy, and they moved after the loss
    assert set(summary["checksums"]) == {"up", "down"}
    assert all(len(v) == 1 for v in summary["checksums"].values())
    # the host left wrote the final checkpoint and the trained policies to the storage
    assert summary["saved"] == {p: f"{tmp_path / 'store'}/policies/{p}" for p in ("up", "down")}
    assert all((tmp_path / "store" / "policies" / p / "adapter_model.safetensors").exists() for p in ("up", "down"))


def test_a_lost_node_with_a_fixed_number_of_hosts_stops_with_a_checkpoint(assets, tmp_path, caplog):
    from marl_ray.storage import Storage
    from marl_ray.train import checkpoint
    from marl_ray.train.loop import HostLost

    out = tmp_path / "run"
    err, seen, _ = _run(assets, out, 2, tmp_path, caplog)
    assert isinstance(err, HostLost), err
    assert seen["collective"]
    assert seen["lost"] in str(err) and "num_hosts" in str(err)
    store = Storage(str(tmp_path / "store"))
    latest = checkpoint.resolve_stored(store, "latest")
    meta, state = checkpoint.load_stored(store, latest)
    assert state["step"] == 1  # the state after step 0: the last good one, written by the host left
    assert {f.split("/")[1] for f in meta["files"] if f.startswith("policies/")} == {"up", "down"}
    assert store.describe(latest) in str(err)
