"""HostGroup: the model hosts as one data-parallel unit that scatters, gathers and sums.

The learner talks to a group, never to a host: a group of one host is the same code path (it
only skips moving gradients when there is nothing to sum). Every host holds a replica of each
policy; the replicas must agree bit for bit (compared once a step, by a fingerprint each host
reduces where its tensors live: `verify`).

One update path: each host keeps the rows it sampled, scores them (`score_kept`) and, once the
learner has their advantages (`keep_advantages`), trains on them. A minibatch shard is a `KeptRows`
(row indices); rows past their holder's share are lent to a host short of its share (`assign`), host
to host. One host steps alone; several Ray hosts form a torch.distributed process group among
themselves (`runtime/collective.py`) and allreduce their gradients host to host: the driver sends
each host which rows of the minibatch it takes and receives the summed statistics, whatever the
adapter's size and the number of hosts. (A group of in-process hosts, which tests and debugging
build, sums its hosts' gradients in this process instead: it has no processes to form a group of.)
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass, field

import torch

from marl_ray.runtime.handles import get, put
from marl_ray.runtime.protocol import (EvalRequest, Evaluation, KeptRows, LossSettings, Minibatch, PolicyState,
                                      TrainResult)
from marl_ray.runtime.trainer import SnapshotMissing


@dataclass(frozen=True)
class GradSync:
    """How the hosts' collective group runs (from `cluster`: collective_backend, collective_timeout_s, ...)."""

    backend: str = "auto"  # auto (gloo on CPUs, nccl on CUDA) | gloo | nccl
    timeout_s: float = 300.0  # every collective (and the group's start) fails after this long
    comm_dtype: str = "fp32"  # fp32 | bf16: the dtype gradients travel in
    bucket_mb: float = 25.0  # gradients are flattened into buckets of about this size

    @classmethod
    def from_cluster(cls, c) -> "GradSync":
        return cls(c.collective_backend, c.collective_timeout_s, c.grad_comm_dtype, c.grad_bucket_mb)


@dataclass
class Traffic:
    """Bytes the driver sent to and received from the hosts in a step (pickled sizes, by kind), when metered:
    samples, scoring, advantages, minibatch rows, gradients, results."""

    sent: int = 0
    received: int = 0
    calls: int = 0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, obj, direction: str):
        n = len(pickle.dumps(obj, protocol=5))
        setattr(self, direction, getattr(self, direction) + n)
        key = f"{direction}/{kind}"
        self.by_kind[key] = self.by_kind.get(key, 0) + n

    @property
    def total(self) -> int:
        return self.sent + self.received


class GroupBroken(RuntimeError):
    """A host of the collective group was restarted (or left it): the group must be formed again."""


class ReplicaDivergence(RuntimeError):
    """Hosts hold different weights for a policy after the same step."""


def split(n: int, parts: int) -> list[range]:
    """Contiguous near-equal shards of range(n); empty ones are dropped."""
    out, start = [], 0
    for k in range(parts):
        size = n // parts + (1 if k < n % parts else 0)
        if size:
            out.append(range(start, start + size))
        start += size
    return out


class HostGroup:
    _generations = itertools.count(1)  # unique in this driver: a group formed by another HostGroup is told apart

    def __init__(self, hosts: list, local: bool = False, sync: GradSync | None = None):
        """hosts: actor handles (or runtime.handles.LocalHandle for in-process hosts)."""
        self.hosts = list(hosts)
        self.local = local
        self.sync = sync or GradSync()
        self.generation = 0  # of the hosts' process group; 0: none formed yet
        self.members: list[tuple] | None = None  # (pid, generation) of each host once the current group formed
        self.traffic: Traffic | None = None  # set a Traffic() to meter the driver's bytes

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int):
        return self.hosts[i]

    def all(self, method: str, *args) -> list:
        """The same call on every host; results in host order."""
        return get([getattr(h, method).remote(*args) for h in self.hosts])

    def agree(self, sums: list[str], what: str) -> str:
        if len(set(sums)) != 1:
            raise ReplicaDivergence(f"{what}: {sums}")
        return sums[0]

    # ------------------------------------------------------------ the hosts' collective group
    @property
    def collective(self) -> bool:
        """True when updates are summed host to host (several Ray hosts)."""
        return not self.local and len(self.hosts) > 1

    def configure(self, sync: GradSync):
        """Take the run's settings; a changed setting drops the current group (formed again on use)."""
        if sync != self.sync:
            self.sync = sync
            self.invalidate()

    def invalidate(self):
        """Forget the current group (after a recovery): the next update forms a new one."""
        self.members = None

    def form(self) -> int:
        """Start a new generation of the hosts' process group: host 0 opens a rendezvous on its node's
        address, every host joins with rank = its index. Returns the generation."""
        self.generation = next(HostGroup._generations)
        self.members = None
        n, t = len(self.hosts), self.sync.timeout_s
        address, port = get(self.hosts[0].open_rendezvous.remote(n, t))
        pids = get([h.join_group.remote(i, n, address, port, self.generation, self.sync.backend, t)
                    for i, h in enumerate(self.hosts)], timeout=t + 30)
        self.members = [(pid, self.generation) for pid in pids]
        return self.generation

    def ensure_group(self):
        """Before a step's updates: form the group if there is none, and check that its hosts are the
        processes that joined it, still in it (a host Ray restarted has a new pid and no group: the others
        would wait for it until the timeout). GroupBroken then: the learner restores and redoes the step."""
        if not self.collective:
            return
        if self.members is None:
            self.form()
            return
        now = [tuple(m) for m in get([h.group_state.remote() for h in self.hosts], timeout=self.sync.timeout_s)]
        if [pid for pid, _ in now] != [pid for pid, _ in self.members]:
            was, self.members = self.members, None
            raise GroupBroken(f"a host was restarted since the hosts' group formed: (pid, generation) {now}, "
                              f"were {was}")
        if now != self.members:  # the same processes, in another group meanwhile (another HostGroup formed one)
            self.form()

    # ------------------------------------------------------------ scoring
    def evaluate(self, req: EvalRequest) -> Evaluation:
        """Split the rows over the hosts; each runs one mixed-adapter pass; concatenated in row order."""
        shards = split(len(req.policies), len(self.hosts))
        reqs = [req.rows(slice(r.start, r.stop)) for r in shards]
        for r in reqs:
            self._sent("score", r)
        outs = get([h.evaluate.remote(r) for h, r in zip(self.hosts, reqs)])
        self._received("scores", outs)
        return Evaluation(*(torch.cat([getattr(o, f) for o in outs]) for f in
                            Evaluation.FIELDS))

    def score_kept(self, requests: dict, held: dict, n: int) -> Evaluation:
        """Each host h scores the rows it keeps (requests[h], a KeptScoring); held[h]: their rows in the
        batch (n rows). Only the scores come back; the rows stay on their hosts."""
        hosts = list(requests)
        for h in hosts:
            self._sent("score", requests[h])
        outs = get([self.hosts[h].score_kept.remote(requests[h]) for h in hosts])
        self._received("scores", outs)
        full = []
        for f in Evaluation.FIELDS:
            first = getattr(outs[0], f)
            t = first.new_zeros((n, *first.shape[1:]))
            for h, o in zip(hosts, outs):
                t[torch.tensor(held[h], dtype=torch.long)] = getattr(o, f)
            full.append(t)
        return Evaluation(*full)

    def keep_advantages(self, token: str, adv: dict, holder: list[int], hold_index: list[int], shape):
        """Send each host the advantages, returns and update masks of the rows it keeps (once a step):
        adv: policy -> PolicyAdvantages (their .rows are batch rows)."""
        a_all, r_all, m_all = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        for a in adv.values():
            idx = torch.tensor(a.rows, dtype=torch.long)
            a_all[idx], r_all[idx], m_all[idx] = a.advantages.float(), a.returns.float(), a.mask.float()
        calls = []
        for h in sorted(set(holder)):
            rows = torch.tensor([i for i in range(len(holder)) if holder[i] == h], dtype=torch.long)
            order = torch.tensor([hold_index[i] for i in rows.tolist()], dtype=torch.long)
            part = [torch.empty((len(rows), shape[1])) for _ in range(3)]
            for t, src in zip(part, (a_all, r_all, m_all)):
                t[order] = src[rows]
            self._sent("advantages", part)
            calls.append(self.hosts[h].keep_advantages.remote(token, *part))
        get(calls)

    def assign(self, token: str, rows: list[int], holder: list[int], hold_index: list[int]) -> list[KeptRows]:
        """Each host's rows of a minibatch (batch rows `rows`) by reference. No host takes more than
        ceil(rows / hosts), the most an even split gives one; within that, each takes the rows it keeps.
        Rows past their holder's share go to the hosts with the fewest, lent host to host (one
        `lend_rows` call per holder and taker, sent before the update that reads it). With every host
        keeping as many rows of the minibatch (give or take one) nothing is lent."""
        n = len(self.hosts)
        cap = -(-len(rows) // n)
        shards = [KeptRows(token, []) for _ in range(n)]
        extra = []
        for g in rows:
            own = shards[holder[g]].own if holder[g] < n else None
            if own is not None and len(own) < cap:
                own.append(hold_index[g])
            else:
                extra.append(g)
        lends: dict[tuple[int, int], list[int]] = {}
        for g in extra:
            t = min(range(n), key=lambda h: len(shards[h]))
            lends.setdefault((holder[g], t), []).append(hold_index[g])
            shards[t].n_borrowed += 1
        for (h, t), idx in lends.items():
            lend = self.hosts[h].kept_rows if self.local else self.hosts[h].lend_rows
            shards[t].borrowed.append(lend.remote(token, idx))
        return shards

    # ------------------------------------------------------------ training
    def submit(self, policy: str, shards: list[Minibatch], total_tokens: float, loss: LossSettings,
               max_grad_norm: float | None):
        """Start one minibatch update of `policy`: shards[i] goes to host i (hosts past the last shard
        have no rows). Returns a pending handle for `finish`; several policies' updates can be in
        flight at once (each host runs them in the order they were sent, so collectives match up)."""
        if self.traffic is not None:
            self.traffic.calls += 1
            for mb in shards:
                self.traffic.add("rows", mb, "sent")
        if len(self.hosts) == 1:  # nothing to sum: forward, backward and step in one call on the host
            return [self.hosts[0].train_minibatch.remote(policy, shards[0], total_tokens, loss, max_grad_norm)]
        if self.collective:
            if self.members is None:
                self.form()
            s = self.sync
            rows = list(shards) + [None] * (len(self.hosts) - len(shards))
            return [h.train_collective.remote(policy, mb, total_tokens, loss, max_grad_norm, self.generation,
                                              s.comm_dtype, int(s.bucket_mb * (1 << 20)))
                    for h, mb in zip(self.hosts, rows)]
        return [h.forward_backward.remote(policy, mb, total_tokens, loss) for h, mb in zip(self.hosts, shards)]

    def finish(self, policy: str, pending: list, max_grad_norm: float | None, what: str = "") -> TrainResult:
        """Wait for `submit`'s update: sum the hosts' gradients and apply one step on every host (or
        take the single host's result, or the hosts' own collective step). Nothing is applied when a
        gradient or statistic is not finite."""
        if len(self.hosts) == 1:
            result = get(pending[0])
            self._received("result", result)
            return result
        results = get(pending)
        self._received("result" if isinstance(results[0], TrainResult) else "grads", results)
        if isinstance(results[0], TrainResult):  # collective: the hosts summed and stepped themselves
            if len({r.applied for r in results}) != 1:
                raise ReplicaDivergence(f"policy {policy!r}: hosts disagree whether to apply {what or 'an update'}")
            return TrainResult(results[0].stats, results[0].applied)
        grads = {k: sum(r.grads[k] for r in results) for k in results[0].grads}
        stats = {k: sum(r.stats[k] for r in results) for k in results[0].stats}
        if not (all(bool(torch.isfinite(v).all()) for v in grads.values())
                and all(torch.isfinite(torch.tensor(v)) for v in stats.values())):
            return TrainResult(stats, False)
        ref = put(grads, self.local)
        if self.traffic is not None:
            self.traffic.add("summed_grads", grads, "sent")
        get([h.optim_step.remote(policy, ref, max_grad_norm) for h in self.hosts])
        return TrainResult(stats, True)

    def verify(self, policies: list[str], what: str):
        """Every host's replicas of `policies` agree (once a step, after its updates): each host reduces
        its tensors to a fingerprint where they live; ReplicaDivergence names the first that differs."""
        if len(self.hosts) < 2:
            return
        prints = self.all("fingerprints", list(policies))
        self._received("fingerprints", prints)
        for p in policies:
            self.agree([f[p] for f in prints], f"policy {p!r}: hosts disagree after {what}")

    def _received(self, kind: str, obj):
        if self.traffic is not None:
            self.traffic.add(kind, obj, "received")

    def _sent(self, kind: str, obj):
        if self.traffic is not None:
            self.traffic.add(kind, obj, "sent")

    # ------------------------------------------------------------ state
    def snapshot(self, tag: int):
        """Every host keeps the state of its policies as it is now, under `tag` (the step it starts),
        where it is: nothing of it comes to the driver."""
        self.all("snapshot", tag)

    def restore(self, tag: int) -> list[int] | None:
        """Every host back to snapshot `tag`: a host that holds it restores it itself, one that lost it (Ray
        restarted it) is refilled from a host that holds it, host to host (a reference the donor put; the
        driver passes the reference on). Returns the refilled hosts' indices; None when no host holds the
        snapshot (then nothing was changed)."""
        missing = []
        for i, h in enumerate(self.hosts):
            try:
                get(h.restore.remote(tag))
            except Exception as e:
                if not _caused_by(e, SnapshotMissing):
                    raise
                missing.append(i)
        if len(missing) == len(self.hosts):
            return None
        if missing:
            donor = next(i for i in range(len(self.hosts)) if i not in missing)
            shared = get(self.hosts[donor].share_snapshot.remote(tag, not self.local))
            get([self.hosts[i].restore_from.remote(shared, tag) for i in missing])
        return missing

    def checksums(self, policy: str) -> list[str]:
        return self.all("checksum", policy)

    def set_state(self, policy: str, state: PolicyState, what: str = "a restore") -> str:
        return self.agree(self.all("set_state", policy, state), f"policy {policy!r}: hosts disagree after {what}")

    def import_policy(self, policy: str, files: dict, what: str = "an import") -> str:
        return self.agree(self.all("import_policy", policy, files), f"policy {policy!r}: hosts disagree after {what}")


def _caused_by(e: BaseException, kind: type) -> bool:
    """`e` is, or was caused by, a `kind` (also raised inside an actor: Ray's error subclasses it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False
