"""HostGroup: the model hosts as one data-parallel unit that scatters, gathers and sums.

The learner talks to a group, never to a host: a group of one host is the same code path (it
only skips moving gradients when there is nothing to sum). Every host holds a replica of each
policy; after every update the replicas must agree bit for bit (checked by checksum).
"""

from __future__ import annotations

import torch

from marl_ray.runtime.handles import get, put
from marl_ray.runtime.protocol import EvalRequest, Evaluation, LossSettings, Minibatch, PolicyState, TrainResult


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
    def __init__(self, hosts: list, local: bool = False):
        """hosts: actor handles (or runtime.handles.LocalHandle for in-process hosts)."""
        self.hosts = list(hosts)
        self.local = local

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

    # ------------------------------------------------------------ scoring
    def evaluate(self, req: EvalRequest) -> Evaluation:
        """Split the rows over the hosts; each runs one mixed-adapter pass; concatenated in row order."""
        shards = split(len(req.policies), len(self.hosts))
        outs = get([h.evaluate.remote(req.rows(slice(r.start, r.stop))) for h, r in zip(self.hosts, shards)])
        return Evaluation(*(torch.cat([getattr(o, f) for o in outs]) for f in
                            ("logprobs_BR", "ref_logprobs_BR", "values_BR", "scores_B", "entropy_BR")))

    # ------------------------------------------------------------ training
    def submit(self, policy: str, shards: list[Minibatch], total_tokens: float, loss: LossSettings,
               max_grad_norm: float | None):
        """Start one minibatch update of `policy`: shards[i] goes to host i. Returns a pending handle for
        `finish`; several policies' updates can be in flight at once."""
        if len(self.hosts) == 1:  # nothing to sum: forward, backward and step in one call on the host
            return [self.hosts[0].train_minibatch.remote(policy, shards[0], total_tokens, loss, max_grad_norm)]
        return [h.forward_backward.remote(policy, mb, total_tokens, loss) for h, mb in zip(self.hosts, shards)]

    def finish(self, policy: str, pending: list, max_grad_norm: float | None, what: str = "") -> TrainResult:
        """Wait for `submit`'s update: sum the hosts' gradients and apply one step on every host (or
        take the single host's result). Nothing is applied when a gradient or statistic is not finite."""
        if len(self.hosts) == 1:
            return get(pending[0])
        results = get(pending)
        grads = {k: sum(r.grads[k] for r in results) for k in results[0].grads}
        stats = {k: sum(r.stats[k] for r in results) for k in results[0].stats}
        if not (all(bool(torch.isfinite(v).all()) for v in grads.values())
                and all(torch.isfinite(torch.tensor(v)) for v in stats.values())):
            return TrainResult(stats, False)
        ref = put(grads, self.local)
        self.agree(get([h.optim_step.remote(policy, ref, max_grad_norm, True) for h in self.hosts]),
                   f"policy {policy!r}: hosts disagree after {what or 'an update'}")
        return TrainResult(stats, True)

    # ------------------------------------------------------------ state
    def checksums(self, policy: str) -> list[str]:
        return self.all("checksum", policy)

    def set_state(self, policy: str, state: PolicyState, what: str = "a restore") -> str:
        return self.agree(self.all("set_state", policy, state), f"policy {policy!r}: hosts disagree after {what}")

    def import_policy(self, policy: str, files: dict, what: str = "an import") -> str:
        return self.agree(self.all("import_policy", policy, files), f"policy {policy!r}: hosts disagree after {what}")
