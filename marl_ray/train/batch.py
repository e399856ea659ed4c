"""One step's trajectories as the learner holds them (the rows themselves stay on the hosts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from marl_ray.model.sampling import RolloutScores


@dataclass
class Batch:
    """One step's trajectories: N rows of [left-padded prompt | response] (T = P + R)."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, R)
    response_start: int  # P
    policies: list[str]
    prompt_ids: list[int]
    rollout: RolloutScores | None = None  # the decode steps' scores (ppo.rollout_logprobs), else None
    group_ids: list[int] = field(default_factory=list)  # (N,) rows of one prompt under one policy share one
    texts: list = field(default_factory=list)  # (N,) each row's prompt text (None: given as token ids)
    columns: list[dict] = field(default_factory=list)  # (N,) each row's prompt fields (for reward functions)
    messages: list = field(default_factory=list)  # (N,) a conversational row's prompt messages (None: text)
    # Rows kept where they were sampled (Learner.rollout): (the learner's token, the rollout's id), the host
    # that keeps each row and its index there, and per host the rollout workers whose parts it keeps, in order.
    kept: tuple[str, int] | None = None
    holder: list[int] = field(default_factory=list)  # (N,)
    hold_index: list[int] = field(default_factory=list)  # (N,)
    kept_workers: dict[int, list[int]] = field(default_factory=dict)
    decoded: tuple[list[str], list[str]] | None = None  # (prompts, completions) as text, once decoded

    def rows(self, policy: str) -> list[int]:
        return [i for i, p in enumerate(self.policies) if p == policy]
