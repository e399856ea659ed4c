"""A model host's place in the hosts' process group: the rendezvous it opens as host 0, the group it
joins, and the sums it takes part in (`runtime/collective.py` holds the group itself)."""

from __future__ import annotations

import os

from marl_ray.runtime import collective


class GroupMember:
    def __init__(self, host_index: int, device):
        self.host_index, self.device = host_index, device
        self.group = None  # collective.Group, once formed
        self._rendezvous = None  # host 0: the store server of the group being formed

    def open_rendezvous(self, world: int, timeout_s: float) -> tuple[str, int]:
        self._rendezvous = collective.Rendezvous(collective.node_address(), world, timeout_s)
        return self._rendezvous.address, self._rendezvous.port

    def join(self, rank: int, world: int, address: str, port: int, generation: int, backend: str,
             timeout_s: float) -> int:
        self.group = None
        rendezvous, self._rendezvous = (self._rendezvous, None) if rank == 0 else (None, None)
        if rank == 0 and rendezvous is None:
            raise RuntimeError("host 0 has no open rendezvous (was it restarted?): form the group again")
        self.group = collective.Group(rank, world, address, port, generation,
                                      collective.resolve_backend(backend, self.device), timeout_s,
                                      rendezvous=rendezvous, device=self.device)
        self.group.barrier()  # every member is connected before the first gradient
        return os.getpid()

    def leave(self):
        self.group = None

    def state(self) -> tuple[int, int]:
        """(this process's id, the generation of its group; 0: none)."""
        return os.getpid(), 0 if self.group is None else self.group.generation

    def sum(self, grads: dict, stats: dict, keys: list[str], generation: int, comm_dtype: str,
            bucket_bytes: int) -> dict:
        """Allreduce `grads` in place (in buckets, in `comm_dtype`) and the statistics `keys` (float64) in the
        group of `generation`; returns the summed statistics."""
        if self.group is None or self.group.generation != generation:
            raise RuntimeError(f"host {self.host_index} is not in the hosts' group generation {generation} "
                               f"(it has {None if self.group is None else self.group.generation}): form it again")
        self.group.allreduce_([grads[k] for k in grads], comm_dtype, bucket_bytes)
        return dict(zip(keys, self.group.allreduce_values([float(stats[k]) for k in keys])))
