"""GRPO-family math (GRPO, DAPO, Dr. GRPO): pure torch functions, no I/O.

Shape suffixes: B = batch rows (one completion each), T = completion length, G = groups.
``group_ids_B`` gives each row its group: the completions of one prompt share an id (any
integers, in any order; rows of a group need not be contiguous). ``mask_BT`` is 1 on real
completion tokens and 0 on padding; masked inputs are read through ``torch.where`` so
whatever sits under padding (garbage, inf, nan) cannot reach the loss or the gradients.

Sharding. A minibatch's loss may be computed in shards (several hosts, or gradient
accumulation) whose gradients are summed. :func:`aggregate` therefore takes the
normalisers of the *whole minibatch* (``n_seqs``, ``n_tokens``, ``max_len``; see
:func:`normalisers`) and returns this shard's share: the shares of the shards add up to the
minibatch's loss, and so do their gradients. :func:`per_token_loss`'s stats are masked sums
plus a token count, which :func:`combine_stats` turns into minibatch means.

Reference: TRL 1.16 ``GRPOTrainer`` (``_generate_and_score_completions`` for the advantages,
``compute_loss`` for the loss); where we differ it is said below.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STAT_KEYS = ("clip_low_sum", "clip_high_sum", "clip_region_sum", "ratio_sum", "kl_sum", "n_tokens")

# torch.isclose(std, 0) with its default atol: how TRL decides "all rewards of a group equal".
_ZERO_STD_ATOL = 1e-8


# --------------------------------------------------------------------------- groups


def group_index(group_ids_B: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index of each row: (index_B int64 in [0, n_groups), n_groups).

    group_ids_B: (B,) integer ids, arbitrary values and order. Groups are numbered in
    sorted order of their ids, so the numbering does not depend on row order.
    """
    if group_ids_B.dim() != 1:
        raise ValueError(f"group_ids_B must be 1-D (B,), got shape {tuple(group_ids_B.shape)}")
    unique_G, index_B = torch.unique(group_ids_B, sorted=True, return_inverse=True)
    return index_B, int(unique_G.numel())


def group_sum(x_B: torch.Tensor, index_B: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of x_B over each group: (n_groups,), with index_B, n_groups from :func:`group_index`."""
    return torch.zeros(n_groups, dtype=x_B.dtype, device=x_B.device).index_add_(0, index_B, x_B)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


class GroupStats(NamedTuple):
    """Per-group reward statistics, see :func:`group_stats`."""

    mean_B: torch.Tensor  # (B,) mean reward of the row's group over its scorable rows
    std_B: torch.Tensor  # (B,) unbiased std of the row's group; 0 with < 2 scorable rows
    zero_std_B: torch.Tensor  # (B,) bool: the row's group has all-equal rewards (no signal)
    scorable_B: torch.Tensor  # (B,) bool: the row's reward is not nan
    zero_std_G: torch.Tensor  # (G,) bool, groups in sorted order of their ids
    frac_reward_zero_std: torch.Tensor  # 0-dim: fraction of *groups* with zero std


def group_stats(rewards_B: torch.Tensor, group_ids_B: torch.Tensor) -> GroupStats:
    """Mean, std and "all rewards equal" flags of each row's group.

    rewards_B: (B,) float; a nan reward marks an unscorable completion (every reward
    function returned None) and is left out of its group's mean and std, as in TRL.
    group_ids_B: (B,) ints. The std is TRL's ``nanstd``: unbiased (Bessel, n - 1), over
    the scorable rows. A group is zero-std when ``torch.isclose(std, 0)`` (std <= 1e-8) as
    in TRL, and also when it has fewer than 2 scorable rows (TRL's std is nan there, so it
    does not count them; they carry no signal either way, so we do).

    ``frac_reward_zero_std`` is the fraction of groups; TRL's metric is the fraction of
    rows, the same number when every group has G rows. ``zero_std_B`` / ``zero_std_G`` are
    the masks dynamic sampling (DAPO) uses to drop such groups.
    """
    rewards_B = _float(rewards_B)
    index_B, n_groups = group_index(group_ids_B)
    scorable_B = ~torch.isnan(rewards_B)
    r_B = torch.where(scorable_B, rewards_B, torch.zeros_like(rewards_B))
    count_G = group_sum(scorable_B.to(r_B.dtype), index_B, n_groups)
    mean_G = group_sum(r_B, index_B, n_groups) / count_G.clamp(min=1)
    dev_B = torch.where(scorable_B, r_B - mean_G[index_B], torch.zeros_like(r_B))
    sq_G = group_sum(dev_B.square(), index_B, n_groups)
    var_G = torch.where(count_G > 1, sq_G / (count_G - 1).clamp(min=1), torch.zeros_like(sq_G))
    std_G = var_G.sqrt()
    zero_std_G = (std_G <= _ZERO_STD_ATOL) | (count_G < 2)
    return GroupStats(
        mean_B=mean_G[index_B],
        std_B=std_G[index_B],
        zero_std_B=zero_std_G[index_B],
        scorable_B=scorable_B,
        zero_std_G=zero_std_G,
        frac_reward_zero_std=zero_std_G.to(r_B.dtype).mean(),
    )


def _scale_mode(scale_rewards: bool | str) -> str:
    # TRL maps True -> "group" and False -> "none" (GRPOConfig.__post_init__).
    mode = "group" if scale_rewards is True else "none" if scale_rewards is False else scale_rewards
    if mode not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: True, False, {', '.join(SCALE_REWARDS)}")
    return mode


def group_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    scale_rewards: bool | str = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, divided by (std + eps) if scaled.

    rewards_B: (B,) float (nan = unscorable); group_ids_B: (B,) ints. Returns (B,).
    scale_rewards: True / "group" divides by the group std (GRPO); False / "none" does not
    (Dr. GRPO); "batch" divides by the std of all scorable rewards of the batch (PPO-Lite),
    the group mean still being subtracted. The std is TRL 1.16's: ``nanstd``, the unbiased
    (n - 1) std over non-nan rewards, plus ``eps`` = 1e-4 added to the std (not the
    variance). A group with all-equal rewards gets advantage 0; unscorable rows and groups
    with a single scorable row get 0 (TRL: nan, then ``nan_to_num`` -> 0). Computed on the
    whole batch of rewards (they are gathered before advantages, as in TRL).
    """
    mode = _scale_mode(scale_rewards)
    stats = group_stats(rewards_B, group_ids_B)
    rewards_B = _float(rewards_B)
    zeros_B = torch.zeros_like(rewards_B)
    r_B = torch.where(stats.scorable_B, rewards_B, zeros_B)
    adv_B = r_B - stats.mean_B
    if mode == "group":
        adv_B = adv_B / (stats.std_B + eps)
    elif mode == "batch":
        n = stats.scorable_B.sum().to(r_B.dtype)
        mean = r_B.sum() / n.clamp(min=1)
        dev_B = torch.where(stats.scorable_B, r_B - mean, zeros_B)
        var = torch.where(n > 1, dev_B.square().sum() / (n - 1).clamp(min=1), torch.zeros_like(mean))
        adv_B = adv_B / (var.sqrt() + eps)
    # Groups with < 2 scorable rows have adv exactly 0 already; unscorable rows are zeroed here.
    return torch.where(stats.scorable_B, adv_B, zeros_B)


def group_advantages_reference(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    scale_rewards: bool | str = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Readable per-group reference for :func:`group_advantages` (same arguments, same
    result up to float rounding); slow. Python floats, ``statistics.stdev`` (n - 1)."""
    mode = _scale_mode(scale_rewards)
    rewards = [float(r) for r in rewards_B]
    ids = [int(g) for g in group_ids_B]
    scorable = [not math.isnan(r) for r in rewards]
    all_scorable = [r for r, ok in zip(rewards, scorable) if ok]
    batch_std = statistics.stdev(all_scorable) if len(all_scorable) > 1 else 0.0
    out = [0.0] * len(rewards)
    for g in set(ids):
        rows = [i for i in range(len(rewards)) if ids[i] == g and scorable[i]]
        members = [rewards[i] for i in rows]
        mean = sum(members) / len(members) if members else 0.0
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        for i in rows:
            adv = rewards[i] - mean
            if mode == "group":
                adv /= std + eps
            elif mode == "batch":
                adv /= batch_std + eps
            out[i] = adv
    return torch.tensor(out, dtype=torch.float64).to(_float(rewards_B).dtype)


# --------------------------------------------------------------------------- loss


def per_token_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logprobs_BT: torch.Tensor | None = None,
    beta: float = 0.0,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate per token, plus beta * k3 KL to the reference, as TRL computes it.

    logprobs_BT: (B, T) current policy (carries grad); old_logprobs_BT, mask_BT: (B, T);
    advantages_B: (B,) one advantage per sequence (GRPO, RLOO), or (B, T) one per token
    (REINFORCE++). With ratio = exp(logp - old) and A the advantage::

        loss = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
               + beta * (exp(ref - logp) - (ref - logp) - 1)

    ``epsilon_high`` defaults to ``epsilon_low`` (DAPO's clip-higher uses 0.28 vs 0.2).
    ``delta`` (TRL's two-sided clipping, INTELLECT-2) caps the unclipped ratio from above.
    ``ref_logprobs_BT`` is required when ``beta != 0``; when given with ``beta == 0`` the
    KL is only measured. Returns (loss_BT, stats): loss_BT is (B, T), 0 on padding; reduce
    it with :func:`aggregate`.

    stats are detached 0-dim *sums over this shard's real tokens*: ``clip_low_sum``
    (ratio < 1 - eps_low and A < 0), ``clip_high_sum`` (ratio > 1 + eps_high and A > 0),
    ``clip_region_sum`` (either), ``ratio_sum``, ``kl_sum`` (0 without a reference), and
    ``n_tokens``. Sum each key over the shards, then divide by the summed ``n_tokens``
    (:func:`combine_stats`): that gives TRL's ``clip_ratio/{low,high,region}_mean`` and
    ``kl`` over the whole minibatch. The clip tests use the ratio before ``delta``, as TRL.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if beta != 0.0 and ref_logprobs_BT is None:
        raise ValueError(f"beta={beta} needs ref_logprobs_BT (pass beta=0.0 to skip the reference)")
    keep_BT = mask_BT.bool()
    zeros_BT = torch.zeros_like(logprobs_BT)
    if advantages_B.dim() == 1:
        adv_BT = advantages_B.unsqueeze(-1).expand_as(logprobs_BT)
    elif advantages_B.shape == logprobs_BT.shape:
        adv_BT = advantages_B
    else:
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logprobs_BT.shape)}, "
                         f"got {tuple(advantages_B.shape)}")
    # Zero padding before exp so inf/nan there cannot poison the forward or the grads.
    adv_BT = torch.where(keep_BT, adv_BT.to(logprobs_BT.dtype), zeros_BT)
    log_ratio_BT = torch.where(keep_BT, logprobs_BT - old_logprobs_BT, zeros_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    clipped_BT = torch.clamp(ratio_BT, 1.0 - epsilon_low, 1.0 + eps_high)
    unclipped_BT = ratio_BT if delta is None else torch.clamp(ratio_BT, max=delta)
    loss_BT = -torch.minimum(unclipped_BT * adv_BT, clipped_BT * adv_BT)
    kl_BT = zeros_BT
    if ref_logprobs_BT is not None:
        d_BT = torch.where(keep_BT, ref_logprobs_BT - logprobs_BT, zeros_BT)
        kl_BT = torch.exp(d_BT) - d_BT - 1.0  # k3 (Schulman): >= 0, unbiased for KL(pi || ref)
        if beta != 0.0:
            loss_BT = loss_BT + beta * kl_BT
    loss_BT = torch.where(keep_BT, loss_BT, zeros_BT)
    with torch.no_grad():  # float32 sums: a bf16 count is exact only up to 256
        low_BT = keep_BT & (ratio_BT < 1.0 - epsilon_low) & (adv_BT < 0)
        high_BT = keep_BT & (ratio_BT > 1.0 + eps_high) & (adv_BT > 0)
        stats = {
            "clip_low_sum": low_BT.sum().float(),
            "clip_high_sum": high_BT.sum().float(),
            "clip_region_sum": (low_BT | high_BT).sum().float(),
            "ratio_sum": torch.where(keep_BT, ratio_BT, zeros_BT).float().sum(),
            "kl_sum": torch.where(keep_BT, kl_BT, zeros_BT).float().sum(),
            "n_tokens": keep_BT.sum().float(),
        }
    return loss_BT, stats


def combine_stats(shard_stats: Iterable[Mapping[str, torch.Tensor | float]]) -> dict[str, float]:
    """Minibatch means from the stats of its shards' :func:`per_token_loss` calls.

    Sums every key over the shards and divides by the summed ``n_tokens``. Returns
    ``clip_low_frac``, ``clip_high_frac``, ``clip_region_frac``, ``ratio_mean``,
    ``kl_mean`` (floats; 0 for an empty minibatch) and ``n_tokens``.
    """
    totals = dict.fromkeys(STAT_KEYS, 0.0)
    for stats in shard_stats:
        for key in STAT_KEYS:
            totals[key] += float(stats[key])
    n = max(totals["n_tokens"], 1.0)
    return {
        "clip_low_frac": totals["clip_low_sum"] / n,
        "clip_high_frac": totals["clip_high_sum"] / n,
        "clip_region_frac": totals["clip_region_sum"] / n,
        "ratio_mean": totals["ratio_sum"] / n,
        "kl_mean": totals["kl_sum"] / n,
        "n_tokens": totals["n_tokens"],
    }


def normalisers(mask_BT: torch.Tensor, max_len: int | None = None) -> dict[str, float | int | None]:
    """The keyword normalisers of :func:`aggregate` for a whole minibatch held in one tensor.

    mask_BT: (B, T) of the *whole* minibatch. ``max_len`` is the Dr. GRPO constant: pass
    the configured maximum completion length (TRL: ``max_completion_length``), not the
    longest completion seen, so the loss scale does not move with the batch. When the rows
    are already spread over hosts, sum ``B`` and ``mask.sum()`` over them instead.
    """
    return {"n_seqs": int(mask_BT.shape[0]), "n_tokens": float(mask_BT.bool().sum()), "max_len": max_len}


def _normaliser(name: str, value: float | torch.Tensor | None, loss_type: str) -> float | torch.Tensor:
    # Counts: at least 1 (TRL's clamp(min=1)), so an all-padding minibatch gives loss 0, not nan.
    if value is None:
        raise ValueError(f"loss_type {loss_type!r} needs the minibatch's {name}")
    if isinstance(value, torch.Tensor):
        return value.clamp(min=1)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return max(value, 1)


def aggregate(
    per_token_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_type: str,
    *,
    n_seqs: int | torch.Tensor | None = None,
    n_tokens: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """This shard's share of the minibatch loss (0-dim); the shards' shares sum to it.

    per_token_BT, mask_BT: (B, T) rows of this shard. The keyword normalisers describe the
    whole minibatch (all shards): ``n_seqs`` its number of sequences, ``n_tokens`` its
    number of real completion tokens, ``max_len`` the constant completion length.

    - ``"grpo"``: mean over each sequence's tokens, then mean over the n_seqs sequences
      (TRL "grpo"; an empty row counts as a sequence with loss 0, like TRL's clamp(min=1)).
    - ``"dapo"``: token sum / n_tokens, the token mean over the whole minibatch (TRL "dapo",
      whose ``num_items_in_batch`` is the global token count; TRL's "bnpo" is the same
      formula over one process's micro-batch only, i.e. ours with a single shard).
    - ``"dr_grpo"``: token sum / (n_seqs * max_len) (TRL "dr_grpo", with max_len =
      ``max_completion_length``).

    TRL computes grpo / dr_grpo per micro-batch and averages over processes and
    accumulation steps, which equals ours when every micro-batch has the same number of
    sequences; ours stays exact for unequal shards.
    """
    keep_BT = mask_BT.bool()
    x_BT = torch.where(keep_BT, per_token_BT, torch.zeros_like(per_token_BT))
    if loss_type == "grpo":
        row_mean_B = x_BT.sum(-1) / keep_BT.sum(-1).clamp(min=1).to(x_BT.dtype)
        return row_mean_B.sum() / _normaliser("n_seqs", n_seqs, loss_type)
    if loss_type == "dapo":
        return x_BT.sum() / _normaliser("n_tokens", n_tokens, loss_type)
    if loss_type == "dr_grpo":
        n = _normaliser("n_seqs", n_seqs, loss_type)
        return x_BT.sum() / (n * _normaliser("max_len", max_len, loss_type))
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
