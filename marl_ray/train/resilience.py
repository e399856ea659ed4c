"""Resilience around a learner step: snapshots, recovery of lost actors, retries, lost nodes.

A step that loses an actor (Ray restarts it) is rolled back to its start on every host and
worker and redone with the same seeds: no sample is lost or counted twice. Ray restarts an actor
that dies between calls without raising anything to the caller; only its new process id gives
it away, so every snapshot records the actors' pids.

The policies' state stays on the hosts: each host keeps its own snapshot of the step's start
(`HostGroup.snapshot`) and restores from it; a host that Ray restarted comes back empty and is
refilled from a peer, host to host. The driver keeps the step, its own small state and the pids.
Only when no host holds the snapshot (every host was restarted: one host, or all of them) does the
run go back to its last checkpoint, or to its start when it has none yet (the hosts' seeded
initial state), and redo the steps from there.

A host that cannot come back (its node is gone for good) is either dropped (the run goes on with
the hosts left, when the number of hosts follows the nodes: `cluster.num_hosts: null`) or stops the
run with a checkpoint of the last good state and a message naming the node (`HostLost`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from marl_ray.runtime.handles import get
from marl_ray.train import saving

log = logging.getLogger(__name__)


class ActorRestarted(RuntimeError):
    """An actor was restarted by Ray since the last snapshot: its in-memory state is gone."""


class HostLost(RuntimeError):
    """A model host's node is gone for good and the run asked for a fixed number of hosts."""


def actor_lost(e: BaseException) -> bool:
    """True for a dead or restarting actor (or an object whose owner died with its actor), also when
    it surfaces inside another actor's task."""
    try:
        from ray.exceptions import ActorUnavailableError, OwnerDiedError, RayActorError
    except ImportError:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (RayActorError, ActorUnavailableError, OwnerDiedError)):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


@dataclass
class Snapshot:
    """The start of a step, as the driver knows it: the hosts keep the policies' state under `step`."""

    step: int
    learner: dict  # Learner.state(host_rng=False): step, KL controllers, workers' stream positions, ledger, ...
    pids: list[int] = field(default_factory=list)  # hosts + workers, read after their state


def _wait_for(probe, deadline: float, what: str, timeout_s: float):
    while True:
        try:
            get(probe.remote(), timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            return
        except Exception as e:  # still restarting
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come back within {timeout_s:.0f}s: {e}") from e
            time.sleep(0.5)


class Resilience:
    """What the learner's loop calls around its steps: `snapshot` after a step, `run_step` (the step with
    recovery), `save` (a checkpoint with recovery), `check` (no actor restarted since the last good state),
    and, inside a recovery, `drop_lost_hosts`. It changes the learner only through the learner's own
    methods (`set_state`, `load_checkpoint`, `regroup`)."""

    def __init__(self, learner, max_retries: int = 3, save_retries: int = 2, timeout_s: float = 300.0):
        self.learner = learner
        self.max_retries, self.save_retries, self.timeout_s = max_retries, save_retries, timeout_s
        self.snap: Snapshot | None = None  # the start of the step in progress
        self.known_pids: list[int] | None = None  # hosts + workers when their state was last known good
        self.start: dict | None = None  # a fresh run's learner state at step 0: where a run with no checkpoint goes back
        self.recoveries = 0  # steps (or saves) redone after an actor was lost

    # ------------------------------------------------------------ what the loop calls
    def snapshot(self) -> Snapshot:
        """Every host keeps its policies' state; the driver the learner's state. The actors' pids are read
        after their state: unchanged pids later prove that no actor restarted meanwhile."""
        learner = self.learner
        learner.hosts.snapshot(learner.step)
        snap = Snapshot(learner.step, learner.state(host_rng=False))
        snap.pids = self.known_pids = self.pids()
        if learner.step == 0 and self.start is None:
            self.start = snap.learner
        self.snap = snap
        return snap

    def check(self):
        """ActorRestarted when an actor was restarted since the last good state (a restarted host holds its
        initial weights: nothing may be read from it as the run's state)."""
        if self.known_pids is not None and self.pids() != self.known_pids:
            raise ActorRestarted(f"an actor was restarted before the checkpoint of step {self.learner.step} was read")

    def run_step(self, step_fn):
        """step_fn() with recovery: on a lost actor, back to the step's start and redo it, up to max_retries
        times; then the snapshot of the next step's start."""
        snap = self.snap
        for attempt in range(self.max_retries + 1):
            try:
                result = step_fn()
                # the hosts keep this snapshot beside `snap`'s: a restart caught here still finds `snap` there
                if self.snapshot().pids != snap.pids:
                    self.snap = snap
                    raise ActorRestarted(f"an actor was restarted during step {self.learner.step - 1}")
                return result
            except Exception as e:
                if attempt == self.max_retries or not (actor_lost(e) or self._restarted(snap)):
                    raise
                self.recoveries += 1
                log.warning("step %d lost an actor (%s); restoring and redoing the step", snap.step, type(e).__name__)
                self._recover_keeping_history()

    def save(self, save_fn):
        """save_fn() (a checkpoint of the current state); an actor lost meanwhile is restored to this very
        state first, then the save is tried again."""
        for attempt in range(self.save_retries + 1):
            try:
                return save_fn()
            except Exception as e:
                if attempt == self.save_retries or not (actor_lost(e) or self._restarted(self.snap)):
                    raise
                self.recoveries += 1
                log.warning("an actor was lost while saving step %d (%s); restoring and saving again",
                            self.learner.step, type(e).__name__)
                self._recover_keeping_history()

    def _recover_keeping_history(self):
        history = list(self.learner.history)  # the snapshot was read before the last step's metrics were added
        if not self.recover():
            self.learner.history = history

    # ------------------------------------------------------------ recovery
    def recover(self) -> bool:
        """Wait for restarted actors, then put every host and worker back to the snapshot: each host from
        its own, a restarted one from a peer's. Returns True when no host held it and the run went back
        further (`rewind`; the snapshot then describes that point).

        Hosts on a node that is gone are handled first (`drop_lost_hosts`): dropped, with their
        rollout workers moved to the nodes left, or, with a fixed number of hosts, `HostLost`."""
        learner, snap = self.learner, self.snap
        deadline = time.monotonic() + self.timeout_s
        rewound = False
        while True:
            self._wait_for_actors(deadline)
            try:
                snap.pids = self.known_pids = self.pids()  # before restoring: a restart after this shows
                refilled = learner.hosts.restore(snap.step)
                if refilled is None:
                    self.rewind()
                    rewound = True
                else:
                    if refilled:
                        log.warning("host(s) %s refilled with step %d's state from a peer", refilled, snap.step)
                    learner.set_state(snap.learner)
                break
            except Exception as e:  # an actor (or its node) went away again while being restored: wait again
                if not actor_lost(e) or time.monotonic() > deadline:
                    raise
                log.warning("an actor was lost while the step's state was restored (%s); waiting for it",
                            type(e).__name__)
        # the hosts' collective group is formed anew by the redone step's first
        # update, among the processes alive now: a failure there is one more lost actor, retried like the rest
        learner.hosts.invalidate()
        return rewound

    def rewind(self):
        """No host holds the step's state: back to the last checkpoint (its policies through the storage or the
        driver, the checkpoint route), or to the run's start when it has none yet (every host was restarted,
        so each holds its seeded initial state). The metrics of the steps to redo are dropped; the snapshot
        becomes that point and every host keeps it."""
        learner, snap = self.learner, self.snap
        was = snap.step
        if learner.last_checkpoint is not None:  # written or resumed from by this run
            where = str(learner.load_checkpoint(str(learner.last_checkpoint)))
        elif self.start is not None:
            learner.set_state(self.start)
            where = "the run's start"
        else:
            raise RuntimeError(f"no host holds the state of step {was}, and the run has no checkpoint to go back to")
        if learner.logger is not None:
            learner.logger.truncate(learner.step)
        learner.hosts.snapshot(learner.step)
        snap.step, snap.learner = learner.step, learner.state(host_rng=False)
        log.warning("no host holds the state of step %d (every host was restarted): back to %s, step %d", was,
                    where, learner.step)

    def drop_lost_hosts(self, gone: list[int]):
        """Hosts `gone` were on nodes that left the cluster. The hosts left restore the snapshot; the rollout
        workers of a lost host are made anew on a node left and resume the stream where the snapshot has
        them. With `cluster.num_hosts` fixed: a checkpoint of the snapshot, then HostLost naming the nodes.
        Otherwise the run goes on with the hosts left (each minibatch split over fewer hosts)."""
        learner, snap = self.learner, self.snap
        nodes = [learner.host_nodes[i] for i in gone]
        keep = [i for i in range(len(learner.hosts)) if i not in gone]
        if not keep:
            raise HostLost(f"every model host is gone (nodes {nodes}); resume from the last checkpoint")
        if learner.respawn_worker is None and any(h in gone for h in learner.worker_host):
            raise HostLost(f"model host(s) {gone} on node(s) {nodes} are gone, and their rollout workers cannot be "
                           "started anew here")
        moved = learner.regroup(keep)
        if learner.cfg.cluster.num_hosts is not None:
            if learner.hosts.restore(snap.step) is None:
                raise HostLost(f"model host(s) {gone} on node(s) {nodes} are gone for good and no host left holds "
                               f"the state of step {snap.step}: resume from the last checkpoint (run.resume=latest)")
            self.known_pids = None
            path = saving.describe(learner, learner.save_checkpoint(state=snap.learner))
            raise HostLost(
                f"model host(s) {gone} on node(s) {nodes} are gone for good and cluster.num_hosts="
                f"{learner.cfg.cluster.num_hosts} asks for a fixed number of hosts: the last good state (step "
                f"{snap.learner['step']}) is saved to {path}. Resume with run.resume=latest once the cluster has "
                "the nodes, or set cluster.num_hosts: null to go on with the hosts left.")
        log.warning("model host(s) %s on node(s) %s are gone for good: going on with %d host(s); rollout "
                    "worker(s) %s started anew", gone, nodes, len(keep), moved)

    # ------------------------------------------------------------ the actors
    def pids(self, timeout: float | None = None) -> list[int]:
        learner = self.learner
        return get([a.pid.remote() for a in list(learner.hosts.hosts) + list(learner.workers)], timeout)

    def _restarted(self, snap: Snapshot) -> bool:
        """True when an actor was restarted since `snap` (or does not answer)."""
        try:
            return self.pids(timeout=60.0) != snap.pids
        except Exception:
            return True

    def lost_hosts(self) -> list[int]:
        """Indices of hosts whose node is no longer alive in the cluster (they cannot be restarted there)."""
        nodes = self.learner.host_nodes
        if not nodes or self.learner.local:
            return []
        from marl_ray.runtime.placement import alive_node_ids

        alive = alive_node_ids()
        return [i for i, n in enumerate(nodes) if n not in alive]

    def _wait_for_actors(self, deadline: float):
        """Until every host and worker answers (dropping the hosts of nodes that are gone meanwhile)."""
        learner = self.learner
        while True:
            gone = self.lost_hosts()
            if gone:
                self.drop_lost_hosts(gone)
            try:
                for i, h in enumerate(learner.hosts.hosts):
                    _wait_for(h.info, min(deadline, time.monotonic() + 10.0), f"host {i}", self.timeout_s)
                for w, worker in enumerate(learner.workers):
                    _wait_for(worker.state, min(deadline, time.monotonic() + 10.0), f"rollout worker {w}",
                              self.timeout_s)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                # a node may have gone meanwhile: look again
