"""A torch.distributed process group among the model hosts: gradients are summed host to host.

Host 0 opens the rendezvous (a TCPStore server on a socket it binds itself, on the address Ray
gives its node: 127.0.0.1 in the tests, a free port); every host then builds the group's process
group object with rank = its index in the host group. No global torch.distributed state is used
(no default group): a recovery simply builds a new group object under a new generation, the old
one is dropped. gloo on CPUs (its sockets bound to the same node address), NCCL on GPUs (the same
calls). Every collective has a timeout: a host that is lost or hangs makes the others' calls fail
(at once when its process died: the sockets close; otherwise after the timeout), never hang.
"""

from __future__ import annotations

import datetime
import socket

import torch

BACKENDS = ("gloo", "nccl")
COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def node_address() -> str:
    """The address Ray gives this process's node (127.0.0.1 on a loopback cluster)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """auto: nccl when the hosts' model lives on a CUDA device, else gloo."""
    if backend != "auto":
        return backend
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


class Rendezvous:
    """Host 0's side of a group's start: the TCPStore server, on a listening socket bound to `address`."""

    def __init__(self, address: str, world: int, timeout_s: float):
        self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.sock.bind((address, 0))
        self.sock.listen(max(128, world))
        self.address, self.port = address, self.sock.getsockname()[1]
        import torch.distributed as dist

        self.store = dist.TCPStore(address, self.port, world, True, datetime.timedelta(seconds=timeout_s),
                                   wait_for_workers=False, master_listen_fd=self.sock.fileno())
        # the store's server owns the descriptor now (and closes it): Python must not close it again,
        # or a later group's connection that reuses the number would be closed under it
        self.sock.detach()


class Group:
    """This host's member of one generation of the hosts' process group."""

    def __init__(self, rank: int, world: int, address: str, port: int, generation: int, backend: str,
                 timeout_s: float, rendezvous: Rendezvous | None = None, device=None):
        import torch.distributed as dist

        if backend not in BACKENDS:
            raise ValueError(f"collective backend {backend!r}: one of {BACKENDS}")
        self.rank, self.world, self.generation, self.backend = rank, world, generation, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device(device or "cpu")
        self._rendezvous = rendezvous  # host 0 keeps its store server alive with the group
        store = rendezvous.store if rendezvous is not None else dist.TCPStore(
            address, port, world, False, self.timeout)
        store = dist.PrefixStore(f"marl_ray/{generation}/", store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = self.timeout
            # gloo's sockets on the node's own address (not whatever the hostname resolves to)
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=node_address())]
            self.pg = dist.ProcessGroupGloo(store, rank, world, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world, opts)

    def allreduce_(self, tensors: list[torch.Tensor], comm_dtype: str = "fp32", bucket_bytes: int = 25 << 20):
        """Sum `tensors` in place over the group: flattened into buckets of about `bucket_bytes` (in the
        communication dtype), every bucket's allreduce started before any is awaited. bf16: each host's
        gradients are rounded to bf16 and summed in bf16, then widened back (every host gets the same bytes)."""
        dtype = COMM_DTYPES[comm_dtype]
        buckets, cur, size = [], [], 0
        for t in tensors:
            cur.append(t)
            size += t.numel() * dtype.itemsize
            if size >= bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
        if cur:
            buckets.append(cur)
        flats = [torch.cat([t.reshape(-1) for t in b]).to(device=self.device, dtype=dtype) for b in buckets]
        work = [self.pg.allreduce([f]) for f in flats]
        for w in work:
            w.wait()
        for b, f in zip(buckets, flats):
            offset = 0
            for t in b:
                n = t.numel()
                t.copy_(f[offset:offset + n].view_as(t))
                offset += n
        return tensors

    def allreduce_values(self, values: list[float]) -> list[float]:
        """The group's sum of a few scalars (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.pg.allreduce([t]).wait()
        return t.tolist()

    def barrier(self):
        self.allreduce_values([0.0])
