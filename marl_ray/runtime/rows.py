"""The rows a model host keeps: what it sampled for a learner, then scored, then the step's advantages.

A host keeps the rows it sampled (`keep`), scores them where they are (the host's `score_kept`
makes the table of a step: `set_table`), takes their advantages once a step (`keep_advantages`) and
trains on minibatches given as row indices (`assemble` a `KeptRows`); rows another host needs are
lent host to host (`lend`: a reference this host owns).
"""

from __future__ import annotations

import torch

from marl_ray.model.sampling import Samples, pad_left
from marl_ray.runtime.handles import get
from marl_ray.runtime.protocol import KeptRows, Minibatch


class RowsLost(RuntimeError):
    """A host was asked for rows it does not keep (it was restarted since it sampled them)."""


class KeptRowStore:
    def __init__(self, host_index: int):
        self.host_index = host_index
        self.parts: dict[str, dict] = {}  # learner token -> {"kept": rollout id, worker: (prompts, policies, Samples)}
        self.tables: dict[str, Minibatch] = {}  # learner token -> its scored rows of the last step scored here

    def keep(self, token: str, kept: int, worker: int, prompts: list, policies: list[str], samples: Samples):
        """Rows a rollout worker's share of rollout `kept` produced here; a learner's older rollout is dropped."""
        parts = self.parts.get(token)
        if parts is None or parts["kept"] != kept:
            parts = self.parts[token] = {"kept": kept}
        parts[worker] = (list(prompts), list(policies), samples)

    def rows_of(self, token: str, kept: int, workers: list[int]) -> tuple[torch.Tensor, torch.Tensor, int, list,
                                                                        Samples]:
        """Workers' parts of rollout `kept`, in that order, as [left-padded prompt | response] rows:
        (input_ids, attention_mask, response_start, policies, samples)."""
        parts = self.parts.get(token)
        missing = [w for w in workers if parts is None or parts["kept"] != kept or w not in parts]
        if missing:
            raise RowsLost(f"host {self.host_index} keeps no rows of rollout {kept} from rollout workers "
                           f"{missing} (was it restarted, or did a later rollout replace them?)")
        got = [parts[w] for w in workers]
        samples = Samples.cat([g[2] for g in got])
        ids, mask = pad_left([p for g in got for p in g[0]], 0)
        return (torch.cat([ids, samples.responses], 1), torch.cat([mask, samples.response_mask], 1), ids.shape[1],
                [p for g in got for p in g[1]], samples)

    def set_table(self, token: str, table: Minibatch):
        self.tables[token] = table

    def keep_advantages(self, token: str, advantages_BR: torch.Tensor, returns_BR: torch.Tensor,
                        mask_BR: torch.Tensor):
        t = self.table(token)
        if advantages_BR.shape != t.mask.shape:
            raise ValueError(f"advantages {tuple(advantages_BR.shape)} for {tuple(t.mask.shape)} kept rows")
        t.advantages, t.returns, t.mask = advantages_BR, returns_BR, mask_BR

    def table(self, token: str) -> Minibatch:
        if token not in self.tables:
            raise RowsLost(f"host {self.host_index} keeps no scored rows for this learner (was it restarted?): "
                           "the step must be redone")
        return self.tables[token]

    def take(self, token: str, idx: list[int]) -> Minibatch:
        return self.table(token).take(idx)

    def lend(self, token: str, idx: list[int]) -> list:
        """Rows for another host, put in the object store by this host: the list holds a reference owned
        here, so the rows go from this host to the one that reads them (not through the caller)."""
        import ray

        return [ray.put(self.take(token, idx))]

    def assemble(self, mb: "Minibatch | KeptRows | None") -> "Minibatch | None":
        """A minibatch shard as tensors: given, or assembled from kept rows and rows lent by other hosts."""
        if not isinstance(mb, KeptRows):
            return mb
        pieces = [self.take(mb.token, mb.own)] if mb.own else []
        for b in (get(list(mb.borrowed)) if mb.borrowed else []):
            pieces.append(get(b[0]) if isinstance(b, list) else b)  # lend's reference, or the rows
        return Minibatch.cat(pieces) if pieces else None
