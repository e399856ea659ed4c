"""From one policy's scored rows to its advantages, per algorithm (pure torch; no Ray, no I/O).

| algorithm     | reward signal                               | advantage                                  |
| ------------- | ------------------------------------------- | ------------------------------------------ |
| ppo           | score at the last token - KL per token      | GAE over the value head, whitened          |
| reinforce_pp  | score at the last token - KL per token      | return-to-go, whitened over the batch      |
| grpo          | sequence score                              | r - group mean (/ group std)               |
| rloo          | sequence score                              | r - mean of the group's other members      |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from marl_ray.algorithms import ppo
from marl_ray.algorithms import grpo, reinforce_pp, rloo


@dataclass
class PolicyAdvantages:
    """One policy's rows of a batch after the reward, the KL penalty and the advantage (R = response length)."""

    rows: list[int]  # indices into the batch
    mask: torch.Tensor  # (n, R) response mask of the update (groups left out by dynamic sampling: 0)
    scores: torch.Tensor  # (n,) total reward x reward_weight
    raw_scores: torch.Tensor  # (n,) the reward before reward_weight
    kl: torch.Tensor  # (n, R) per-token KL estimate (logp - ref; 0 where no reference pass ran)
    kl_coef: float
    advantages: torch.Tensor  # (n, R)
    returns: torch.Tensor  # (n, R) (critic-free: the advantages; no value head reads them)
    finite: bool  # False: a NaN/inf somewhere: this policy's update is skipped this step
    extra: dict | None = None  # algorithm metrics (e.g. reward/frac_zero_std)


def compute(spec, scores_n, raw_scores_n, logprobs_nR, ref_logprobs_nR, values_nR, mask_nR, kl_coef: float,
            group_ids: list[int], gamma: float, lam: float, whiten: bool, kl_penalty: str) -> PolicyAdvantages:
    """The advantages of one policy's n rows under spec.algorithm (rows = positions in the batch are
    filled in by the caller). group_ids[i]: the prompt group of row i (grpo, rloo)."""
    mask = mask_nR.float()
    extra = {}
    kl = (logprobs_nR - ref_logprobs_nR) * mask if spec.uses_reference else torch.zeros_like(mask)
    if spec.algorithm in ("ppo", "reinforce_pp"):
        rewards, kl = ppo.rewards_with_kl(scores_n, logprobs_nR, ref_logprobs_nR, mask, kl_coef, kind=kl_penalty)
        if spec.algorithm == "ppo":
            adv, ret = ppo.gae(rewards, values_nR, mask, gamma=gamma, lam=lam)
            if whiten:
                adv = ppo.masked_whiten(adv, mask)
        else:  # REINFORCE++: return-to-go (gamma 1, no critic), whitened over the policy's whole batch
            ret = reinforce_pp.returns(rewards, mask)
            adv = reinforce_pp.advantages(ret, mask)
        checked = (rewards, adv, ret)
    else:
        gid = torch.tensor(group_ids, device=scores_n.device)
        if spec.algorithm == "grpo":
            adv_n = grpo.group_advantages(scores_n, gid, scale_rewards=spec.scale_rewards)
        else:
            adv_n = rloo.rloo_advantages(scores_n, gid)
        groups = grpo.group_stats(scores_n, gid)
        extra["reward/frac_zero_std"] = float(groups.frac_reward_zero_std)
        # A NaN total (every reward function said "not applicable") is unscorable: advantage 0, as in
        # TRL, and left out of the update; dynamic sampling leaves out groups with nothing to compare.
        keep = groups.scorable_B & ~groups.zero_std_B if spec.dynamic_sampling else groups.scorable_B
        mask = mask * keep.float()[:, None]
        adv = adv_n[:, None] * mask
        ret = adv
        checked = (adv,)
        scores_n = torch.where(groups.scorable_B, scores_n, torch.zeros_like(scores_n))
    real = mask.bool()
    finite = all(bool(torch.isfinite(x[real]).all()) for x in checked) and bool(torch.isfinite(scores_n).all())
    return PolicyAdvantages([], mask, scores_n, raw_scores_n, kl, kl_coef, adv, ret, finite, extra)
