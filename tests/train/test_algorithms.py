"""Tests for marl_ray.algorithms: GRPO family, RLOO, REINFORCE++ and the registry.

Each function is checked against numbers worked out by hand, against a loop version, for
invariance under padding and row order, and (losses) for shards adding up to the
minibatch. The TRL checks restate TRL 1.16's GRPOTrainer / RLOOTrainer code (importing
trl would pull in transformers and accelerate, seconds of import for four lines of math).
"""

import dataclasses
import math

import pytest
import torch

from marl_ray.algorithms import ALGORITHMS, Algorithm
from marl_ray.algorithms import reinforce_pp
from marl_ray.algorithms.grpo import (
    LOSS_TYPES,
    aggregate,
    combine_stats,
    group_advantages,
    group_advantages_reference,
    group_stats,
    normalisers,
    per_token_loss,
)
from marl_ray.algorithms.rloo import rloo_advantages, rloo_advantages_reference

EPS = 1e-4


def _random_mask(B, T, gen, left=False):
    """Rows of random length (0..T) of ones, right-padded (or left-padded)."""
    lengths_B = torch.randint(0, T + 1, (B,), generator=gen)
    lengths_B[0] = T  # always one row without padding
    pos_BT = torch.arange(T).expand(B, T)
    if left:
        return (pos_BT >= (T - lengths_B).unsqueeze(1)).float()
    return (pos_BT < lengths_B.unsqueeze(1)).float()


def _garbage_under(x_BT, mask_BT, gen, scale=1e3):
    """Copy of x_BT with big random numbers at masked positions."""
    junk_BT = torch.randn(x_BT.shape, generator=gen) * scale
    return torch.where(mask_BT.bool(), x_BT, junk_BT)


def _shuffled_groups(n_groups, G, gen):
    """Group ids (arbitrary values, rows of a group scattered) and the rewards' grouping."""
    ids_B = (torch.arange(n_groups) * 7 + 3).repeat_interleave(G)
    return ids_B[torch.randperm(n_groups * G, generator=gen)]


def _rewards(B, gen, discrete=True):
    """Rewards with ties (so some groups are all equal) or continuous ones."""
    if discrete:
        return torch.randint(0, 2, (B,), generator=gen).float()
    return torch.randn(B, generator=gen)


def _loss_inputs(B, T, gen, left=False):
    mask_BT = _random_mask(B, T, gen, left=left)
    old_BT = -torch.rand(B, T, generator=gen) * 3
    lp_BT = old_BT + torch.randn(B, T, generator=gen) * 0.3  # ratios around 1, some clipped
    ref_BT = old_BT + torch.randn(B, T, generator=gen) * 0.3
    adv_B = torch.randn(B, generator=gen)
    return lp_BT, old_BT, ref_BT, adv_B, mask_BT


# --------------------------------------------------------------------------- TRL 1.16, restated


def trl_nanstd(tensor, dim=None):
    """trl.trainer.utils.nanstd (1.16): Bessel-corrected std over non-nan values, nan if n < 2."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    return std.squeeze() if dim is None else std.squeeze(dim)


def trl_grpo_advantages(rewards, num_generations, scale_rewards):
    """GRPOTrainer._generate_and_score_completions, sum_then_normalize, rows grouped contiguously."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:  # "batch"
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def trl_rloo_advantages(rewards, num_generations, normalize_advantages):
    """RLOOTrainer._generate_and_score_completions (beta = 0), rows grouped contiguously."""
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_per_token_loss(per_token_logps, old_per_token_logps, advantages, ref_per_token_logps,
                       beta, epsilon_low, epsilon_high):
    """GRPOTrainer.compute_loss up to the aggregation (token-level IS, no delta)."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    return per_token_loss, per_token_kl, is_low_clipped, is_high_clipped


def trl_micro_loss(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch,
                   num_processes, gradient_accumulation_steps, steps_per_generation):
    """GRPOTrainer.compute_loss's aggregation of one micro-batch on one process (train mode)."""
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return loss / gradient_accumulation_steps
    if loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        return loss / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        return loss / gradient_accumulation_steps
    if loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(loss_type)


# --------------------------------------------------------------------------- loop versions


def per_token_loss_loop(lp_BT, old_BT, adv, mask_BT, eps_low, eps_high, ref_BT=None, beta=0.0):
    """Element by element with math.*; adv is (B,) or (B, T). Returns (loss_BT, stat sums)."""
    B, T = lp_BT.shape
    out_BT = torch.zeros(B, T, dtype=torch.float64)
    low = high = ratio_sum = kl_sum = n = 0.0
    for b in range(B):
        for t in range(T):
            if mask_BT[b, t] == 0:
                continue
            a = float(adv[b]) if adv.dim() == 1 else float(adv[b, t])
            r = math.exp(float(lp_BT[b, t]) - float(old_BT[b, t]))
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            loss = -min(r * a, c * a)
            if ref_BT is not None:
                d = float(ref_BT[b, t]) - float(lp_BT[b, t])
                kl = math.exp(d) - d - 1
                kl_sum += kl
                loss += beta * kl
            out_BT[b, t] = loss
            low += r < 1 - eps_low and a < 0
            high += r > 1 + eps_high and a > 0
            ratio_sum += r
            n += 1
    stats = {"clip_low_sum": low, "clip_high_sum": high, "ratio_sum": ratio_sum, "kl_sum": kl_sum, "n_tokens": n}
    return out_BT, stats


def aggregate_loop(per_token_BT, mask_BT, loss_type, n_seqs, n_tokens, max_len):
    total = 0.0
    for b in range(per_token_BT.shape[0]):
        vals = [float(per_token_BT[b, t]) for t in range(per_token_BT.shape[1]) if mask_BT[b, t] != 0]
        if loss_type == "grpo":
            total += (sum(vals) / len(vals) if vals else 0.0) / n_seqs
        elif loss_type == "dapo":
            total += sum(vals) / n_tokens
        else:
            total += sum(vals) / (n_seqs * max_len)
    return total


# --------------------------------------------------------------------------- group advantages


# Hand example, groups scattered over the rows: ids [3, 9, 3, 3, 9, 4, 4],
# rewards [1, 0, 2, 3, 4, 5, 5].
#   group 3: rewards 1, 2, 3 -> mean 2, unbiased var (1 + 0 + 1) / 2 = 1, std 1
#   group 9: rewards 0, 4    -> mean 2, unbiased var (4 + 4) / 1 = 8, std 2 sqrt 2
#   group 4: rewards 5, 5    -> mean 5, std 0: all equal, advantage 0
HAND_IDS = torch.tensor([3, 9, 3, 3, 9, 4, 4])
HAND_REWARDS = torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0, 5.0, 5.0])


def test_group_advantages_by_hand():
    s2 = 2 * math.sqrt(2)
    expected = [-1 / (1 + EPS), -2 / (s2 + EPS), 0.0, 1 / (1 + EPS), 2 / (s2 + EPS), 0.0, 0.0]
    torch.testing.assert_close(group_advantages(HAND_REWARDS, HAND_IDS), torch.tensor(expected))
    torch.testing.assert_close(group_advantages(HAND_REWARDS, HAND_IDS, scale_rewards="group"), torch.tensor(expected))
    # Dr. GRPO: only the mean is removed.
    dr = group_advantages(HAND_REWARDS, HAND_IDS, scale_rewards=False)
    torch.testing.assert_close(dr, torch.tensor([-1.0, -2.0, 0.0, 1.0, 2.0, 0.0, 0.0]))
    assert torch.equal(dr, group_advantages(HAND_REWARDS, HAND_IDS, scale_rewards="none"))
    # "batch": group mean removed, divided by the std of all 7 rewards (sum 20, mean 20/7).
    mean = 20 / 7
    batch_std = math.sqrt(sum((r - mean) ** 2 for r in HAND_REWARDS.tolist()) / 6)
    batch = group_advantages(HAND_REWARDS, HAND_IDS, scale_rewards="batch")
    torch.testing.assert_close(batch, torch.tensor([-1.0, -2.0, 0.0, 1.0, 2.0, 0.0, 0.0]) / (batch_std + EPS))


def test_group_stats_by_hand():
    stats = group_stats(HAND_REWARDS, HAND_IDS)
    torch.testing.assert_close(stats.mean_B, torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 5.0, 5.0]))
    s2 = 2 * math.sqrt(2)
    torch.testing.assert_close(stats.std_B, torch.tensor([1.0, s2, 1.0, 1.0, s2, 0.0, 0.0]))
    assert stats.zero_std_B.tolist() == [False, False, False, False, False, True, True]
    assert stats.zero_std_G.tolist() == [False, True, False]  # sorted ids 3, 4, 9
    torch.testing.assert_close(stats.frac_reward_zero_std, torch.tensor(1 / 3))
    assert stats.scorable_B.all()


def test_group_stats_zero_std_with_float_ties():
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point: still "all equal" (TRL's isclose).
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.5])
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    stats = group_stats(rewards, ids)
    assert stats.zero_std_G.tolist() == [True, True, False]
    # r - mean is rounding noise there, divided by eps as in TRL: negligible, not exactly 0.
    assert group_advantages(rewards, ids)[:6].abs().max() < 1e-2


def test_group_advantages_nan_and_singleton():
    # Row 2 is unscorable (nan): left out of group 0's stats, advantage 0. Group 0 over
    # rewards 1, 3: mean 2, std sqrt 2. Groups 5 and 1 have a single row: advantage 0.
    rewards = torch.tensor([1.0, 3.0, float("nan"), 2.0, 4.0])
    ids = torch.tensor([0, 0, 0, 5, 1])
    adv = group_advantages(rewards, ids)
    r2 = math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([-1 / (r2 + EPS), 1 / (r2 + EPS), 0.0, 0.0, 0.0]))
    stats = group_stats(rewards, ids)
    assert stats.scorable_B.tolist() == [True, True, False, True, True]
    assert stats.zero_std_G.tolist() == [False, True, True]  # singletons carry no signal
    # Same as dropping the nan row.
    keep = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(adv[keep], group_advantages(rewards[keep], ids[keep]))


@pytest.mark.parametrize("scale", [True, False, "batch"])
@pytest.mark.parametrize("discrete", [True, False])
def test_group_advantages_match_reference(scale, discrete):
    gen = torch.Generator().manual_seed(11)
    for n_groups, G in [(1, 2), (3, 4), (8, 3)]:
        ids_B = _shuffled_groups(n_groups, G, gen)
        rewards_B = _rewards(n_groups * G, gen, discrete)
        rewards_B[torch.rand(n_groups * G, generator=gen) < 0.15] = float("nan")
        fast = group_advantages(rewards_B, ids_B, scale_rewards=scale)
        ref = group_advantages_reference(rewards_B, ids_B, scale_rewards=scale)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [True, False, "batch"])
def test_group_advantages_row_order_invariant(scale):
    gen = torch.Generator().manual_seed(12)
    ids_B = _shuffled_groups(6, 4, gen)
    rewards_B = _rewards(24, gen, discrete=False)
    adv_B = group_advantages(rewards_B, ids_B, scale_rewards=scale)
    perm = torch.randperm(24, generator=gen)
    torch.testing.assert_close(group_advantages(rewards_B[perm], ids_B[perm], scale_rewards=scale), adv_B[perm])
    stats, pstats = group_stats(rewards_B, ids_B), group_stats(rewards_B[perm], ids_B[perm])
    assert torch.equal(pstats.zero_std_B, stats.zero_std_B[perm])
    # Relabelling the groups (ids are just labels) changes nothing either.
    torch.testing.assert_close(group_advantages(rewards_B, ids_B * 100 - 5, scale_rewards=scale), adv_B)


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_group_advantages_match_trl(scale):
    gen = torch.Generator().manual_seed(13)
    n_groups, G = 6, 4
    rewards = torch.randint(0, 3, (n_groups * G,), generator=gen).float() * 0.5  # ties -> zero-std groups
    rewards[5] = float("nan")  # an unscorable completion
    rewards[8:12] = 1.0  # a group with all-equal rewards
    ids = torch.arange(n_groups).repeat_interleave(G)  # TRL's layout: groups contiguous
    trl_adv, trl_zero = trl_grpo_advantages(rewards, G, scale)
    torch.testing.assert_close(group_advantages(rewards, ids, scale_rewards=scale), trl_adv)
    if scale != "batch":
        stats = group_stats(rewards, ids)
        assert torch.equal(stats.zero_std_B, trl_zero)
        # TRL's fraction is over rows: equal to ours (over groups) with G rows per group.
        torch.testing.assert_close(stats.frac_reward_zero_std, trl_zero.float().mean())


def test_group_advantages_bad_scale():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(HAND_REWARDS, HAND_IDS, scale_rewards="global")


# --------------------------------------------------------------------------- RLOO


def test_rloo_by_hand():
    # group 0: 1, 2, 3 -> baselines (2+3)/2, (1+3)/2, (1+2)/2 -> advantages -1.5, 0, 1.5
    # group 1: 4, 0    -> baselines 0, 4                     -> advantages 4, -4
    # group 2: 7 alone -> no baseline                        -> 0
    rewards = torch.tensor([1.0, 4.0, 2.0, 7.0, 3.0, 0.0])
    ids = torch.tensor([0, 1, 0, 2, 0, 1])
    torch.testing.assert_close(rloo_advantages(rewards, ids), torch.tensor([-1.5, 4.0, 0.0, 0.0, 1.5, -4.0]))
    # normalize: over the 5 rows with a baseline, values -1.5, 4, 0, 1.5, -4: mean 0,
    # unbiased var (2.25 + 16 + 0 + 2.25 + 16) / 4 = 9.125
    std = math.sqrt(9.125)
    expected = torch.tensor([-1.5, 4.0, 0.0, 0.0, 1.5, -4.0]) / (std + EPS)
    torch.testing.assert_close(rloo_advantages(rewards, ids, normalize=True), expected)


def test_rloo_is_scaled_dr_grpo():
    # r_i - mean(others) = G / (G - 1) * (r_i - mean(all)).
    gen = torch.Generator().manual_seed(21)
    G = 5
    ids = _shuffled_groups(4, G, gen)
    rewards = _rewards(4 * G, gen, discrete=False)
    torch.testing.assert_close(rloo_advantages(rewards, ids), G / (G - 1) * group_advantages(rewards, ids, False))


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_matches_reference_and_row_order(normalize):
    gen = torch.Generator().manual_seed(22)
    for n_groups, G in [(1, 2), (4, 3), (7, 4)]:
        B = n_groups * G
        ids = _shuffled_groups(n_groups, G, gen)
        rewards = _rewards(B, gen, discrete=bool(n_groups % 2))
        rewards[torch.rand(B, generator=gen) < 0.15] = float("nan")
        adv = rloo_advantages(rewards, ids, normalize=normalize)
        torch.testing.assert_close(adv, rloo_advantages_reference(rewards, ids, normalize=normalize),
                                   atol=1e-5, rtol=1e-5)
        perm = torch.randperm(B, generator=gen)
        torch.testing.assert_close(rloo_advantages(rewards[perm], ids[perm], normalize=normalize), adv[perm])


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_matches_trl(normalize):
    gen = torch.Generator().manual_seed(23)
    G = 4
    rewards = torch.randn(5 * G, generator=gen)
    rewards[[2, 9, 10, 11]] = float("nan")  # group 2 keeps a single scorable row: no baseline
    ids = torch.arange(5).repeat_interleave(G)
    torch.testing.assert_close(rloo_advantages(rewards, ids, normalize=normalize),
                               trl_rloo_advantages(rewards, G, normalize))


# --------------------------------------------------------------------------- per-token loss


def _hand_loss_inputs():
    # eps_low 0.2, eps_high 0.28 (clip-higher). Row 0 has A = +1, row 1 has A = -1.
    #   row 0: ratio 1.5 -> -min(1.5, 1.28)   = -1.28  clipped high
    #          ratio 0.7 -> -min(0.7, 0.8)    = -0.7   below 1 - eps but A > 0: not clipped
    #          ratio 1.1 -> -min(1.1, 1.1)    = -1.1
    #   row 1: ratio 0.5 -> -min(-0.5, -0.8)  =  0.8   clipped low
    #          ratio 1.5 -> -min(-1.5, -1.28) =  1.5   pessimistic: unclipped wins, not clipped
    #          padding (ratio e^50, advantage would be huge)
    ratios = [[1.5, 0.7, 1.1], [0.5, 1.5, 1.0]]
    old_BT = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.2, 0.0]])
    lp_BT = old_BT + torch.tensor([[math.log(r) for r in row] for row in ratios])
    lp_BT[1, 2] = 50.0
    mask_BT = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return lp_BT, old_BT, torch.tensor([1.0, -1.0]), mask_BT


def test_per_token_loss_and_aggregate_by_hand():
    lp_BT, old_BT, adv_B, mask_BT = _hand_loss_inputs()
    loss_BT, stats = per_token_loss(lp_BT, old_BT, adv_B, mask_BT, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss_BT, torch.tensor([[-1.28, -0.7, -1.1], [0.8, 1.5, 0.0]]))
    assert {k: float(v) for k, v in stats.items()} == pytest.approx(
        {"clip_low_sum": 1, "clip_high_sum": 1, "clip_region_sum": 2, "ratio_sum": 5.3, "kl_sum": 0, "n_tokens": 5})
    means = combine_stats([stats])
    assert means["clip_region_frac"] == pytest.approx(0.4) and means["ratio_mean"] == pytest.approx(1.06)
    # grpo:    row means -3.08 / 3 and 2.3 / 2, mean over 2 sequences
    # dapo:    token sum -0.78 over 5 tokens
    # dr_grpo: token sum -0.78 over 2 sequences * max_len 4
    norms = dict(n_seqs=2, n_tokens=5, max_len=4)
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "grpo", **norms), torch.tensor((-3.08 / 3 + 1.15) / 2))
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "dapo", **norms), torch.tensor(-0.78 / 5))
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "dr_grpo", **norms), torch.tensor(-0.78 / 8))
    assert normalisers(mask_BT, max_len=4) == {"n_seqs": 2, "n_tokens": 5.0, "max_len": 4}


def test_per_token_loss_epsilon_high_defaults_to_low_and_delta():
    lp_BT, old_BT, adv_B, mask_BT = _hand_loss_inputs()
    sym_BT, _ = per_token_loss(lp_BT, old_BT, adv_B, mask_BT, epsilon_low=0.2)
    assert sym_BT[0, 0].item() == pytest.approx(-1.2)  # 1.5 clipped at 1 + 0.2
    # delta (two-sided clipping) caps the unclipped ratio: ratio 5, A = -1, delta 3:
    # -min(-3, -1.2) = 3 instead of 5.
    old = torch.tensor([[0.0]])
    lp = torch.tensor([[math.log(5.0)]])
    adv = torch.tensor([-1.0])
    one = torch.ones(1, 1)
    assert per_token_loss(lp, old, adv, one)[0].item() == pytest.approx(5.0)
    assert per_token_loss(lp, old, adv, one, delta=3.0)[0].item() == pytest.approx(3.0)


def test_per_token_loss_k3_kl_by_hand_and_grad():
    # ratio 1 (old = logp) and A = 0: the loss is beta * k3 with d = ref - logp:
    #   d = log 2:  2   - log 2 - 1 = 0.306853
    #   d = 0:      0
    #   d = -log 2: 0.5 + log 2 - 1 = 0.193147
    # d k3 / d logp = 1 - e^d: -1, 0, 0.5
    lp_BT = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], requires_grad=True)
    ref_BT = lp_BT.detach() + torch.tensor([[math.log(2), 0.0, -math.log(2), 99.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    k3 = [2 - math.log(2) - 1, 0.0, 0.5 + math.log(2) - 1, 0.0]
    loss_BT, stats = per_token_loss(lp_BT, lp_BT.detach(), torch.zeros(1), mask_BT, ref_logprobs_BT=ref_BT, beta=0.1)
    torch.testing.assert_close(loss_BT, 0.1 * torch.tensor([k3]))
    assert float(stats["kl_sum"]) == pytest.approx(sum(k3))
    loss_BT.sum().backward()
    torch.testing.assert_close(lp_BT.grad, 0.1 * torch.tensor([[-1.0, 0.0, 0.5, 0.0]]))
    # beta 0 with a reference: KL measured, not in the loss; beta > 0 without one: error.
    loss0_BT, stats0 = per_token_loss(lp_BT, lp_BT.detach(), torch.zeros(1), mask_BT, ref_logprobs_BT=ref_BT)
    assert (loss0_BT == 0).all() and float(stats0["kl_sum"]) == pytest.approx(sum(k3))
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        per_token_loss(lp_BT, lp_BT.detach(), torch.zeros(1), mask_BT, beta=0.1)


def test_per_token_loss_grad_at_ratio_one():
    gen = torch.Generator().manual_seed(31)
    lp_BT, _, _, adv_B, mask_BT = _loss_inputs(4, 6, gen)
    lp_BT.requires_grad_()
    loss_BT, _ = per_token_loss(lp_BT, lp_BT.detach(), adv_B, mask_BT)
    loss_BT.sum().backward()
    # d/dlogp of -ratio * A at ratio 1 is -A, on real tokens only.
    torch.testing.assert_close(lp_BT.grad, -adv_B.unsqueeze(1) * mask_BT)


@pytest.mark.parametrize("token_level", [False, True])
def test_per_token_loss_matches_loop(token_level):
    gen = torch.Generator().manual_seed(32)
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(7, 9, gen)
    adv = torch.randn(7, 9, generator=gen) if token_level else adv_B
    loss_BT, stats = per_token_loss(lp_BT, old_BT, adv, mask_BT, 0.2, 0.28, ref_BT, beta=0.04)
    loop_BT, loop_stats = per_token_loss_loop(lp_BT, old_BT, adv, mask_BT, 0.2, 0.28, ref_BT, beta=0.04)
    torch.testing.assert_close(loss_BT.double(), loop_BT, atol=1e-5, rtol=1e-5)
    assert loop_stats["clip_low_sum"] > 0 and loop_stats["clip_high_sum"] > 0  # the case is not trivial
    for key, value in loop_stats.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-5), key
    assert float(stats["clip_region_sum"]) == loop_stats["clip_low_sum"] + loop_stats["clip_high_sum"]


def test_per_token_loss_advantage_per_sequence_equals_broadcast():
    gen = torch.Generator().manual_seed(33)
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(5, 6, gen)
    a, sa = per_token_loss(lp_BT, old_BT, adv_B, mask_BT, 0.2, 0.3, ref_BT, 0.1)
    b, sb = per_token_loss(lp_BT, old_BT, adv_B.unsqueeze(1).expand(5, 6), mask_BT, 0.2, 0.3, ref_BT, 0.1)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="advantages"):
        per_token_loss(lp_BT, old_BT, adv_B[:3].unsqueeze(1), mask_BT)


@pytest.mark.parametrize("left", [False, True])
def test_per_token_loss_invariant_to_garbage_and_finite_grads(left):
    gen = torch.Generator().manual_seed(34)
    lp_BT, old_BT, ref_BT, _, mask_BT = _loss_inputs(6, 8, gen, left=left)
    adv_BT = torch.randn(6, 8, generator=gen)
    loss_BT, stats = per_token_loss(lp_BT, old_BT, adv_BT, mask_BT, 0.2, 0.28, ref_BT, beta=0.05)
    pad = ~mask_BT.bool()
    lp2_BT = torch.where(pad, 1e4, lp_BT).requires_grad_()
    old2_BT = torch.where(pad, float("nan"), old_BT)
    ref2_BT = torch.where(pad, float("inf"), ref_BT)
    adv2_BT = _garbage_under(adv_BT, mask_BT, gen, scale=1e6)
    loss2_BT, stats2 = per_token_loss(lp2_BT, old2_BT, adv2_BT, mask_BT, 0.2, 0.28, ref2_BT, beta=0.05)
    assert torch.equal(loss_BT, loss2_BT)
    assert all(torch.equal(stats[k], stats2[k]) for k in stats)
    for loss_type in LOSS_TYPES:
        lp2_BT.grad = None
        aggregate(loss2_BT, mask_BT, loss_type, **normalisers(mask_BT, max_len=8)).backward(retain_graph=True)
        assert torch.isfinite(lp2_BT.grad).all() and (lp2_BT.grad[pad] == 0).all()


def test_per_token_loss_matches_trl():
    gen = torch.Generator().manual_seed(35)
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(8, 10, gen)
    for beta in (0.0, 0.04):
        ours_BT, stats = per_token_loss(lp_BT, old_BT, adv_B, mask_BT, 0.2, 0.28, ref_BT, beta)
        trl_BT, trl_kl, low, high = trl_per_token_loss(lp_BT, old_BT, adv_B, ref_BT, beta, 0.2, 0.28)
        torch.testing.assert_close(ours_BT, trl_BT * mask_BT)
        means = combine_stats([stats])
        n = mask_BT.sum()
        assert means["clip_low_frac"] == pytest.approx(float((low * mask_BT).sum() / n))
        assert means["clip_high_frac"] == pytest.approx(float((high * mask_BT).sum() / n))
        assert means["clip_region_frac"] == pytest.approx(float(((low | high) * mask_BT).sum() / n))
        assert means["kl_mean"] == pytest.approx(float((trl_kl * mask_BT).sum() / n))


# --------------------------------------------------------------------------- aggregate


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_matches_loop(loss_type):
    gen = torch.Generator().manual_seed(41)
    mask_BT = _random_mask(9, 7, gen)
    mask_BT[3] = 0  # an empty row: counts as a sequence with loss 0
    x_BT = _garbage_under(torch.randn(9, 7, generator=gen), mask_BT, gen)
    norms = dict(n_seqs=9, n_tokens=float(mask_BT.sum()), max_len=12)
    expected = aggregate_loop(x_BT, mask_BT, loss_type, **norms)
    assert float(aggregate(x_BT, mask_BT, loss_type, **norms)) == pytest.approx(expected, rel=1e-5)
    # tensor normalisers (e.g. all-reduced counts) give the same
    tnorms = dict(n_seqs=torch.tensor(9.0), n_tokens=mask_BT.sum(), max_len=12)
    assert float(aggregate(x_BT, mask_BT, loss_type, **tnorms)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_invariant_to_padding_and_row_order(loss_type):
    gen = torch.Generator().manual_seed(42)
    B, T = 8, 6
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(B, T, gen)
    norms = normalisers(mask_BT, max_len=10)
    loss = aggregate(per_token_loss(lp_BT, old_BT, adv_B, mask_BT, 0.2, 0.28, ref_BT, 0.02)[0], mask_BT,
                     loss_type, **norms)
    # Three extra padding columns full of garbage.
    widen = lambda x_BT: torch.cat([x_BT, torch.randn(B, 3, generator=gen) * 1e3], dim=1)  # noqa: E731
    mask2_BT = torch.cat([mask_BT, torch.zeros(B, 3)], dim=1)
    loss_BT2, _ = per_token_loss(widen(lp_BT), widen(old_BT), adv_B, mask2_BT, 0.2, 0.28, widen(ref_BT), 0.02)
    torch.testing.assert_close(aggregate(loss_BT2, mask2_BT, loss_type, **norms), loss)
    # Rows permuted (with their advantages).
    perm = torch.randperm(B, generator=gen)
    loss_BT3, _ = per_token_loss(lp_BT[perm], old_BT[perm], adv_B[perm], mask_BT[perm], 0.2, 0.28, ref_BT[perm], 0.02)
    torch.testing.assert_close(aggregate(loss_BT3, mask_BT[perm], loss_type, **norms), loss)


def test_aggregate_bad_arguments():
    x_BT, mask_BT = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        aggregate(x_BT, mask_BT, "bnpo", n_seqs=2, n_tokens=6, max_len=3)
    with pytest.raises(ValueError, match="n_tokens"):
        aggregate(x_BT, mask_BT, "dapo", n_seqs=2)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x_BT, mask_BT, "dr_grpo", n_seqs=2, n_tokens=6)
    with pytest.raises(ValueError, match="n_seqs"):
        aggregate(x_BT, mask_BT, "grpo", n_tokens=6)
    # an all-padding minibatch: loss 0, not nan
    assert aggregate(x_BT, torch.zeros(2, 3), "dapo", n_tokens=0).item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_shards_add_up_to_minibatch_loss_and_grads(loss_type):
    gen = torch.Generator().manual_seed(43)
    B, T = 10, 7
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(B, T, gen)
    mask_BT[4] = 0  # an empty row inside a shard
    norms = normalisers(mask_BT, max_len=12)

    whole_BT = lp_BT.clone().requires_grad_()
    loss_BT, stats = per_token_loss(whole_BT, old_BT, adv_B, mask_BT, 0.2, 0.28, ref_BT, beta=0.05)
    loss = aggregate(loss_BT, mask_BT, loss_type, **norms)
    loss.backward()

    sharded_BT = lp_BT.clone().requires_grad_()
    total, shard_stats = 0.0, []
    for lo, hi in [(0, 3), (3, 4), (4, 10)]:  # unequal shards, one of a single row
        part_BT, part_stats = per_token_loss(sharded_BT[lo:hi], old_BT[lo:hi], adv_B[lo:hi], mask_BT[lo:hi],
                                             0.2, 0.28, ref_BT[lo:hi], beta=0.05)
        share = aggregate(part_BT, mask_BT[lo:hi], loss_type, **norms)
        share.backward()  # gradients accumulate: the sum over shards
        total += share.detach()
        shard_stats.append(part_stats)
    torch.testing.assert_close(total, loss.detach())
    torch.testing.assert_close(sharded_BT.grad, whole_BT.grad)
    whole, parts = combine_stats([stats]), combine_stats(shard_stats)
    assert parts == pytest.approx(whole)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_aggregate_matches_trl_over_processes_and_accumulation(loss_type):
    # TRL: 2 processes x 2 accumulation steps, micro-batches of 3 sequences; DDP averages
    # the processes' gradients, accumulation sums the steps, so the optimised loss is
    # sum(micro losses) / num_processes. Ours: the same 12 rows as 4 shards with the
    # minibatch's normalisers. TRL's "bnpo" normalises by each micro-batch's own token
    # count: it equals our "dapo" on a single micro-batch only.
    gen = torch.Generator().manual_seed(44)
    P, GA, b, T, L = 2, 2, 3, 6, 8
    B = P * GA * b
    lp_BT, old_BT, ref_BT, adv_B, mask_BT = _loss_inputs(B, T, gen)
    trl_BT, *_ = trl_per_token_loss(lp_BT, old_BT, adv_B, ref_BT, 0.04, 0.2, 0.28)
    ours_BT, _ = per_token_loss(lp_BT, old_BT, adv_B, mask_BT, 0.2, 0.28, ref_BT, 0.04)
    if loss_type == "bnpo":
        trl = trl_micro_loss(trl_BT[:b], mask_BT[:b], "bnpo", L, None, 1, 1, 1)
        ours = aggregate(ours_BT[:b], mask_BT[:b], "dapo", **normalisers(mask_BT[:b]))
        torch.testing.assert_close(ours, trl)
        return
    num_items_in_batch = mask_BT.sum()
    trl = sum(trl_micro_loss(trl_BT[lo:lo + b], mask_BT[lo:lo + b], loss_type, L, num_items_in_batch, P, GA, GA)
              for lo in range(0, B, b)) / P
    norms = normalisers(mask_BT, max_len=L)
    ours = sum(aggregate(ours_BT[lo:lo + b], mask_BT[lo:lo + b], loss_type, **norms) for lo in range(0, B, b))
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(aggregate(ours_BT, mask_BT, loss_type, **norms), trl)


# --------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_by_hand():
    # kl_coef 0.1. Row 0: kl = logp - ref = [0.5, -1], score 1 on t=1, t=2 padding.
    #              Row 1 (left-padded): kl [pad, 0, 1], score 2 on t=2.
    scores_B = torch.tensor([1.0, 2.0])
    lp_BT = torch.tensor([[-1.0, -2.0, 7.0], [5.0, -1.0, -1.0]])
    ref_BT = torch.tensor([[-1.5, -1.0, -9.0], [float("nan"), -1.0, -2.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    rewards_BT, kl_BT = reinforce_pp.token_rewards(scores_B, lp_BT, ref_BT, mask_BT, kl_coef=0.1)
    torch.testing.assert_close(kl_BT, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(rewards_BT, torch.tensor([[-0.05, 1.1, 0.0], [0.0, 0.0, 1.9]]))
    # gamma 1: reverse cumulative sums          gamma 0.5: G_t = r_t + 0.5 G_next
    #   row 0: [1.05, 1.1, 0]                     row 0: [-0.05 + 0.55, 1.1, 0] = [0.5, 1.1, 0]
    #   row 1: [0, 1.9, 1.9]                      row 1: [0, 0.95, 1.9]
    ret_BT = reinforce_pp.returns(rewards_BT, mask_BT)
    torch.testing.assert_close(ret_BT, torch.tensor([[1.05, 1.1, 0.0], [0.0, 1.9, 1.9]]))
    torch.testing.assert_close(reinforce_pp.returns(rewards_BT, mask_BT, gamma=0.5),
                               torch.tensor([[0.5, 1.1, 0.0], [0.0, 0.95, 1.9]]))
    # Whitening over the 4 real tokens 1.05, 1.1, 1.9, 1.9: mean 1.4875,
    # unbiased var (0.4375^2 + 0.3875^2 + 2 * 0.4125^2) / 3 = 0.2256250
    adv_BT = reinforce_pp.advantages(ret_BT, mask_BT)
    std = math.sqrt((0.4375**2 + 0.3875**2 + 2 * 0.4125**2) / 3)
    expected = torch.tensor([[-0.4375, -0.3875, 0.0], [0.0, 0.4125, 0.4125]]) / math.sqrt(std**2 + 1e-8)
    torch.testing.assert_close(adv_BT, expected)
    adv2_BT, ret2_BT, kl2_BT = reinforce_pp.compute_advantages(scores_B, lp_BT, ref_BT, mask_BT, 0.1)
    assert torch.equal(adv2_BT, adv_BT) and torch.equal(ret2_BT, ret_BT) and torch.equal(kl2_BT, kl_BT)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_returns_match_loop_with_holes(gamma):
    gen = torch.Generator().manual_seed(51)
    mask_BT = torch.rand(8, 9, generator=gen) > 0.3  # holes anywhere
    rewards_BT = torch.randn(8, 9, generator=gen)
    ret_BT = reinforce_pp.returns(rewards_BT, mask_BT, gamma)
    torch.testing.assert_close(ret_BT, reinforce_pp.returns_reference(rewards_BT, mask_BT, gamma))


@pytest.mark.parametrize("left", [False, True])
def test_reinforce_pp_invariant_to_garbage_and_row_order(left):
    gen = torch.Generator().manual_seed(52)
    B, T = 7, 8
    mask_BT = _random_mask(B, T, gen, left=left)
    scores_B = torch.randn(B, generator=gen)
    lp_BT = -torch.rand(B, T, generator=gen) * 2
    ref_BT = lp_BT + 0.2 * torch.randn(B, T, generator=gen)
    adv_BT, ret_BT, kl_BT = reinforce_pp.compute_advantages(scores_B, lp_BT, ref_BT, mask_BT, 0.05)
    kept = ret_BT[mask_BT.bool()]
    torch.testing.assert_close(adv_BT[mask_BT.bool()], (kept - kept.mean()) / kept.std(), atol=1e-4, rtol=1e-4)
    pad = ~mask_BT.bool()
    out = reinforce_pp.compute_advantages(scores_B, torch.where(pad, float("-inf"), lp_BT),
                                          torch.where(pad, float("nan"), ref_BT), mask_BT, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(out, (adv_BT, ret_BT, kl_BT)))
    perm = torch.randperm(B, generator=gen)
    adv_p, ret_p, _ = reinforce_pp.compute_advantages(scores_B[perm], lp_BT[perm], ref_BT[perm], mask_BT[perm], 0.05)
    torch.testing.assert_close(adv_p, adv_BT[perm])
    torch.testing.assert_close(ret_p, ret_BT[perm])


def test_reinforce_pp_policy_loss_shards_add_up():
    gen = torch.Generator().manual_seed(53)
    B, T = 9, 6
    lp_BT, old_BT, _, _, mask_BT = _loss_inputs(B, T, gen)
    adv_BT = reinforce_pp.advantages(torch.randn(B, T, generator=gen), mask_BT)
    norms = normalisers(mask_BT)
    whole_BT = lp_BT.clone().requires_grad_()
    loss, _ = reinforce_pp.policy_loss(whole_BT, old_BT, adv_BT, mask_BT, 0.2, 0.28, n_tokens=norms["n_tokens"])
    loss.backward()
    loop_BT, _ = per_token_loss_loop(lp_BT, old_BT, adv_BT, mask_BT, 0.2, 0.28)
    assert float(loss.detach()) == pytest.approx(float(loop_BT.sum()) / norms["n_tokens"], rel=1e-5)
    sharded_BT = lp_BT.clone().requires_grad_()
    total = 0.0
    for lo, hi in [(0, 2), (2, 7), (7, 9)]:
        share, _ = reinforce_pp.policy_loss(sharded_BT[lo:hi], old_BT[lo:hi], adv_BT[lo:hi], mask_BT[lo:hi],
                                            0.2, 0.28, n_tokens=norms["n_tokens"])
        share.backward()
        total += share.detach()
    torch.testing.assert_close(total, loss.detach())
    torch.testing.assert_close(sharded_BT.grad, whole_BT.grad)


# --------------------------------------------------------------------------- registry


def test_registry():
    assert set(ALGORITHMS) == {"ppo", "grpo", "rloo", "reinforce_pp"}
    assert [name for name, a in ALGORITHMS.items() if a.critic] == ["ppo"]
    assert {name for name, a in ALGORITHMS.items() if a.groups} == {"grpo", "rloo"}
    assert ALGORITHMS["grpo"] == Algorithm(critic=False, groups=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ALGORITHMS["ppo"].critic = False


def test_production_reinforce_pp_advantages_are_the_modules():
    """The learner's advantages of a reinforce_pp policy (algorithms/advantages.py) are reinforce_pp.compute_advantages
    on the policy's rows: the module the tests above check is the one production runs."""
    from marl_ray.config.schema import PolicySpec
    from marl_ray.algorithms import advantages as adv_math

    gen = torch.Generator().manual_seed(3)
    B, T = 6, 5
    scores_B = torch.randn(B, generator=gen)
    lp_BT, ref_BT = -torch.rand(B, T, generator=gen) * 3, -torch.rand(B, T, generator=gen) * 3
    mask_BT = (torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]).float()
    spec = PolicySpec(name="p", reward=("r",), algorithm="reinforce_pp")
    got = adv_math.compute(spec, scores_B, scores_B, lp_BT, ref_BT, torch.zeros(B, T), mask_BT, 0.05, [],
                           1.0, 0.95, True, "kl")
    adv_BT, ret_BT, kl_BT = reinforce_pp.compute_advantages(scores_B, lp_BT, ref_BT, mask_BT, 0.05)
    assert torch.equal(got.advantages, adv_BT) and torch.equal(got.returns, ret_BT) and torch.equal(got.kl, kl_BT)
