"""The only place that starts Ray, builds placement groups and sets ray.remote options.

Local default: a Ray bound to 127.0.0.1 (never the machine's outward address). In a
`ray job submit` job, RAY_ADDRESS is set and we join that cluster instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from marl_ray import console

log = logging.getLogger(__name__)


def _is_loopback(address: str) -> bool:
    """True for 127.0.0.1:PORT, localhost:PORT, [::1]:PORT (with or without a scheme)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join `address` (or RAY_ADDRESS), or start a private local Ray on loopback."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not _is_loopback(address):
        ray.init(address=address, log_to_driver=not console.quiet())  # a real cluster: Ray finds this node's address
        return
    # A private Ray, or a cluster bound to 127.0.0.1 (deployments/local_head.sh): stay on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read by the Ray processes started here
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # Ray read the variable when it was imported (before this function ran); without this, ray.init
        # resolves 127.0.0.1 (the address, and _node_ip_address) to this machine's outward IP.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ray.init(address=address, log_to_driver=not console.quiet())
    else:
        # address="local": always a new private instance, never one found via /tmp/ray/ray_current_cluster.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=not console.quiet())


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def alive_node_ids() -> set[str]:
    return {n["NodeID"] for n in alive_nodes()}


@dataclass
class Placement:
    """Where each host runs: a node id per host, and the placement group when one is used."""

    node_ids: list[str]
    strategies: list  # one scheduling strategy per host
    pg: object = None


def place_hosts(num_hosts: int | None, hosts_per_node: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                placement: str = "spread", timeout_s: float = 120.0) -> Placement:
    """Reserve a slot per model host: one per node by default (STRICT_SPREAD), or
    `hosts_per_node` per node (e.g. one per GPU), pinned by node affinity."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    nodes = alive_nodes()
    n = num_hosts or len(nodes) * hosts_per_node
    if n > len(nodes) * hosts_per_node:
        raise RuntimeError(f"{n} hosts need {-(-n // hosts_per_node)} nodes at {hosts_per_node} per node; "
                           f"the cluster has {len(nodes)} alive node(s)")
    bundle = {"CPU": max(num_cpus, 0.001)}
    if num_gpus:
        bundle["GPU"] = num_gpus
    if placement == "spread" and hosts_per_node == 1:
        pg = placement_group([dict(bundle) for _ in range(n)], strategy="STRICT_SPREAD")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except Exception as e:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"could not reserve {n} host slots of {bundle} on distinct nodes within "
                               f"{timeout_s:.0f}s: {e}") from e
        table = ray.util.placement_group_table(pg)
        node_ids = [table["bundles_to_node_id"][i] for i in range(n)]
        strategies = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in range(n)]
        return Placement(node_ids, strategies, pg)
    # Several hosts per node (one per GPU), or explicit node affinity.
    node_ids = [nodes[i // hosts_per_node]["NodeID"] for i in range(n)]
    strategies = [NodeAffinitySchedulingStrategy(node_id=nid, soft=False) for nid in node_ids]
    return Placement(node_ids, strategies)


def host_options(placement: Placement, i: int, num_cpus: float, num_gpus: float, max_restarts: int = 0) -> dict:
    # Ray restarts a dead host in its slot; the learner restores its state (no task retries:
    # the learner redoes the whole step, so nothing runs twice).
    opts = {"scheduling_strategy": placement.strategies[i], "num_cpus": num_cpus, "max_concurrency": 1,
            "max_restarts": max_restarts, "max_task_retries": 0}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return opts


def worker_options(node_id: str, max_restarts: int = 0) -> dict:
    """Rollout workers sit on their host's node and reserve no CPU (they mostly wait on it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            "max_restarts": max_restarts, "max_task_retries": 0}


@dataclass
class Actors:
    """What `start_actors` / `start_inprocess` made: workers[w] streams to hosts[worker_host[w]]."""

    hosts: list
    workers: list
    worker_host: list[int]
    host_nodes: list[str] | None = None  # node id of each host (Ray)
    pg: object = None  # the hosts' placement group, if one was made
    respawn_worker: object = None  # (w, node_id) -> a new rollout worker w on that node


def _worker_args(cfg, w: int) -> tuple:
    c = cfg.cluster
    return (cfg.model.tokenizer or cfg.model.base, cfg.data.prompts, w, c.rollout_workers, cfg.data.max_prompt_tokens,
            cfg.data.seed, cfg.data.split, cfg.data.prompt_field, cfg.data.eval_fraction)


def start_actors(cfg, seed: int) -> Actors:
    """Model hosts (one per node by default) and rollout workers (spread over the hosts' nodes)."""
    import ray

    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.rollout import RolloutWorker

    c = cfg.cluster
    pl = place_hosts(c.num_hosts, c.hosts_per_node, c.host_num_cpus, c.host_num_gpus, c.placement)
    Host = ray.remote(ModelHost)
    Worker = ray.remote(RolloutWorker)
    threads = max(1, int(round(c.host_num_cpus)))
    hosts = [Host.options(**host_options(pl, i, c.host_num_cpus, c.host_num_gpus, c.max_restarts)).remote(
        cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=seed, torch_threads=threads, host_index=i,
        optimizer_steps=cfg.ppo.optimizer_steps)
        for i in range(len(pl.node_ids))]

    def worker(w: int, node_id: str):
        return Worker.options(**worker_options(node_id, c.max_restarts)).remote(*_worker_args(cfg, w))

    worker_host = [w % len(hosts) for w in range(c.rollout_workers)]
    workers = [worker(w, pl.node_ids[worker_host[w]]) for w in range(c.rollout_workers)]
    return Actors(hosts, workers, worker_host, list(pl.node_ids), pl.pg, worker)


def start_inprocess(cfg, seed: int) -> Actors:
    """The same host and workers as plain objects in this process (one host), behind LocalHandle."""
    from marl_ray.runtime.handles import LocalHandle
    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.rollout import RolloutWorker

    c = cfg.cluster
    host = ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=seed,
                     torch_threads=max(1, int(round(c.host_num_cpus))), host_index=0,
                     optimizer_steps=cfg.ppo.optimizer_steps)
    workers = [LocalHandle(RolloutWorker(*_worker_args(cfg, w))) for w in range(c.rollout_workers)]
    return Actors([LocalHandle(host)], workers, [0] * c.rollout_workers)


def shutdown_actors(actors, pg=None):
    import ray

    from marl_ray.runtime.handles import LocalHandle

    for a in actors:
        if isinstance(a, LocalHandle):
            continue
        try:
            ray.kill(a)
        except Exception:
            pass
    if pg is not None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:
            pass
