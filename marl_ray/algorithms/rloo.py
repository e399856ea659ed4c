"""RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) advantages: pure torch, no I/O.

Each of a prompt's G completions is baselined by the mean reward of the *other* G - 1:
A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean). The loss is the
GRPO-family clipped surrogate on these per-sequence advantages
(:func:`marl_ray.algorithms.grpo.per_token_loss` and ``aggregate``).

TRL 1.16's ``RLOOTrainer`` computes the same advantages (nan rewards left out of the
baseline, a row with no scorable sibling gets 0) but uses a sequence-level importance ratio
and a mean over sequences; here the token-level ratio of the GRPO family is used.
"""

from __future__ import annotations

import math

import torch

from marl_ray.algorithms.grpo import group_index, group_sum


def rloo_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    normalize: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Leave-one-out advantages: r_i minus the mean of the other members of its group.

    rewards_B: (B,) float, nan = unscorable (left out of every baseline, advantage 0);
    group_ids_B: (B,) ints, any values and order. Returns (B,). A row without another
    scorable member in its group (G < 2) has no baseline and gets 0. ``normalize``
    (TRL's ``normalize_advantages``) then standardises over the rows that have a
    baseline: (A - mean) / (unbiased std + eps).
    """
    rewards_B = rewards_B if rewards_B.is_floating_point() else rewards_B.float()
    index_B, n_groups = group_index(group_ids_B)
    scorable_B = ~torch.isnan(rewards_B)
    zeros_B = torch.zeros_like(rewards_B)
    r_B = torch.where(scorable_B, rewards_B, zeros_B)
    count_B = group_sum(scorable_B.to(r_B.dtype), index_B, n_groups)[index_B]
    sum_B = group_sum(r_B, index_B, n_groups)[index_B]
    valid_B = scorable_B & (count_B > 1)
    baseline_B = (sum_B - r_B) / (count_B - 1).clamp(min=1)
    adv_B = torch.where(valid_B, r_B - baseline_B, zeros_B)
    if normalize:
        n = valid_B.sum().to(r_B.dtype)
        mean = adv_B.sum() / n.clamp(min=1)
        dev_B = torch.where(valid_B, adv_B - mean, zeros_B)
        std = torch.where(n > 1, dev_B.square().sum() / (n - 1).clamp(min=1), torch.zeros_like(mean)).sqrt()
        adv_B = torch.where(valid_B, dev_B / (std + eps), zeros_B)
    return adv_B


def rloo_advantages_reference(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    normalize: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Readable per-row reference for :func:`rloo_advantages` (same arguments, same result
    up to float rounding); slow."""
    rewards = [float(r) for r in rewards_B]
    ids = [int(g) for g in group_ids_B]
    out, valid = [0.0] * len(rewards), [False] * len(rewards)
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in range(len(rewards))
                  if j != i and ids[j] == ids[i] and not math.isnan(rewards[j])]
        if not math.isnan(r) and others:
            out[i], valid[i] = r - sum(others) / len(others), True
    if normalize:
        kept = [a for a, ok in zip(out, valid) if ok]
        mean = sum(kept) / len(kept) if kept else 0.0
        std = math.sqrt(sum((a - mean) ** 2 for a in kept) / (len(kept) - 1)) if len(kept) > 1 else 0.0
        out = [(a - mean) / (std + eps) if ok else 0.0 for a, ok in zip(out, valid)]
    dtype = rewards_B.dtype if rewards_B.is_floating_point() else torch.float32
    return torch.tensor(out, dtype=torch.float64).to(dtype)
