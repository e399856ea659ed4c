"""The typed messages that cross actor boundaries (learner <-> host group <-> hosts, worker <-> host).

Every call between actors takes and returns these (or plain scalars, lists of token ids and
tensor dicts keyed by parameter name): a renamed field fails where it is used, not at run time
in another process. The model-side results are defined next to the code that makes them and
re-exported here: `Evaluation` and `RolloutScores` (model/passes.py), `SamplingSettings` and
`Samples` (model/sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from marl_ray.model.passes import Evaluation, RolloutScores
from marl_ray.model.sampling import Samples, SamplingSettings

__all__ = ["Evaluation", "RolloutScores", "Samples", "SamplingSettings", "RolloutPart", "EvalRequest", "KeptScoring",
           "Minibatch", "KeptRows", "LossSettings", "Gradients", "TrainResult", "PolicyState"]


@dataclass
class RolloutPart:
    """A rollout worker's share of a step: its prompts (each answered by every policy) and the host's
    samples of them. `samples` holds what the host's `sample` calls returned, or (on Ray) references
    to those results: the responses go from the host to the learner, never through the worker."""

    worker: int
    prompt_ids: list[int]  # (N,) index of each row's prompt in the stream
    prompts: list[list[int]]  # (N,) token ids of each row's prompt
    policies: list[str]  # (N,) the policy that answers each row
    samples: list[Any]  # Samples, or ObjectRefs to them, in row order
    texts: list[str | None] = field(default_factory=list)  # (N,) the prompt's text (None: given as token ids)
    columns: list[dict] = field(default_factory=list)  # (N,) the prompt row's other fields (for reward functions)
    messages: list[list[dict] | None] = field(default_factory=list)  # (N,) a conversation's messages, else None


@dataclass
class EvalRequest:
    """Rows [left-padded prompt | response] to score under their policy, the reference and their reward."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    policies: list[str]  # (B,)
    rewards: list[str | None]  # (B,) reward adapter of each row; None: none (its score is NaN)
    response_start: int  # P
    rollout: RolloutScores | None = None  # decode-step scores: no policy rows in the pass
    reference: list[bool] | None = None  # (B,) False: no reference row (ref logprobs 0); None: all
    chunk: int | None = None  # rows per pass (ppo.micro_batch_size); None: all of a host's rows in one

    def rows(self, sl: slice) -> "EvalRequest":
        roll = None if self.rollout is None else RolloutScores(
            self.rollout.logprobs_BR[sl], self.rollout.values_BR[sl], self.rollout.entropy_BR[sl])
        ref = None if self.reference is None else self.reference[sl]
        return EvalRequest(self.input_ids[sl], self.attention_mask[sl], self.policies[sl], self.rewards[sl],
                           self.response_start, roll, ref, self.chunk)

    def take(self, order: list[int]) -> "EvalRequest":
        """Rows order[0], order[1], ... (a permutation or a selection)."""
        idx = torch.tensor(order, dtype=torch.long)
        roll = None if self.rollout is None else RolloutScores(
            *(getattr(self.rollout, f)[idx] for f in RolloutScores.FIELDS))
        ref = None if self.reference is None else [self.reference[i] for i in order]
        return EvalRequest(self.input_ids[idx], self.attention_mask[idx], [self.policies[i] for i in order],
                           [self.rewards[i] for i in order], self.response_start, roll, ref, self.chunk)


@dataclass(frozen=True)
class LossSettings:
    """What a host needs to compute its shard's share of a minibatch loss of one policy."""

    cliprange: float
    cliprange_value: float
    vf_coef: float
    micro_batch_size: int | None = None  # rows per forward/backward chunk; None = the whole shard
    algorithm: str = "ppo"  # ppo: clipped surrogate + value loss; otherwise critic-free (marl_ray/algorithms)
    loss_type: str = "dapo"  # critic-free: grpo | dapo | dr_grpo (see algorithms.grpo.aggregate)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # critic-free: weight of the k3 KL to the reference in the loss
    n_seqs: int = 0  # the whole minibatch's sequences (critic-free normaliser)
    max_len: int = 0  # generation.max_new_tokens (dr_grpo's normaliser)


@dataclass
class Minibatch:
    """One host's rows of a minibatch of one policy (B rows, R response positions)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    response_start: int
    mask: torch.Tensor  # (B, R) response mask
    old_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor | None = None  # (B, R), for a loss with a KL term (critic-free, beta > 0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def chunk(self, lo: int, hi: int) -> "Minibatch":
        return self.take(slice(lo, hi))

    def take(self, idx) -> "Minibatch":
        """Rows idx (a slice, or a list / tensor of row indices)."""
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long)
        ref = None if self.ref_logprobs is None else self.ref_logprobs[idx]
        return Minibatch(self.input_ids[idx], self.attention_mask[idx], self.response_start,
                         self.mask[idx], self.old_logprobs[idx], self.old_values[idx],
                         self.advantages[idx], self.returns[idx], ref)

    @staticmethod
    def cat(parts: list["Minibatch"]) -> "Minibatch":
        """The rows of `parts` in order; prompts left-padded (token 0, mask 0) to the longest part's, so
        parts scored on different hosts (each padded to its own longest prompt) line up."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        P = max(p.response_start for p in parts)

        def pad(t: torch.Tensor, p: Minibatch) -> torch.Tensor:
            return torch.nn.functional.pad(t, (P - p.response_start, 0))

        refs = [p.ref_logprobs for p in parts]
        return Minibatch(torch.cat([pad(p.input_ids, p) for p in parts]),
                         torch.cat([pad(p.attention_mask, p) for p in parts]), P,
                         *(torch.cat([getattr(p, f) for p in parts])
                           for f in ("mask", "old_logprobs", "old_values", "advantages", "returns")),
                         None if any(r is None for r in refs) else torch.cat(refs))


@dataclass
class KeptScoring:
    """Score the rows a host sampled itself and keeps (`sample(..., keep=)`): its parts of rollout `kept` of
    learner `token`, from the rollout workers `workers` in that order; per row of those parts, in order,
    its reward adapter and whether it needs a reference row. The host keeps the rows with their scores
    for the step's updates (`KeptRows`)."""

    token: str
    kept: int  # the learner's rollout id
    workers: list[int]
    rewards: list[str | None]
    reference: list[bool] | None = None
    rollout: bool = False  # take the decode steps' scores (ppo.rollout_logprobs) instead of a policy pass
    chunk: int | None = None


@dataclass
class KeptRows:
    """One host's rows of a minibatch by reference: indices into the rows it keeps for learner `token`,
    and rows other hosts keep, lent to it (their `lend_rows` results, fetched host to host)."""

    token: str
    own: list[int]
    borrowed: list[Any] = field(default_factory=list)
    n_borrowed: int = 0  # rows in `borrowed`

    def __len__(self) -> int:
        return len(self.own) + self.n_borrowed


@dataclass
class Gradients:
    """A host's gradients of its shard's share of a minibatch loss, and that share's statistics."""

    grads: dict[str, torch.Tensor]  # parameter name -> gradient
    stats: dict[str, float]  # loss and diagnostics, already weighted by the shard's token share


@dataclass
class TrainResult:
    """The outcome of one minibatch update of one policy across the host group."""

    stats: dict[str, float]
    applied: bool  # False: a non-finite gradient or statistic; nothing was changed


@dataclass
class PolicyState:
    """Everything trainable of a policy on a host: weights and optimizer state (snapshots, recovery)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
