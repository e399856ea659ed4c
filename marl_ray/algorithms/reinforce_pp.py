"""REINFORCE++ (Hu 2025) math: pure torch functions, no I/O.

Critic-free and group-free: each token's reward is -kl_coef * (logp - ref) (the k1 KL,
OpenRLHF's default), plus the sequence score on the last real token; the return is the
reverse cumulative sum of those rewards (gamma = 1 by default); the advantage is the return
whitened over *all real tokens of the batch* (one global mean and std, no per-prompt
baseline). The policy loss is the PPO clipped surrogate with these (B, T) advantages.

Shapes and masking as in :mod:`marl_ray.algorithms.ppo`: B = batch, T = completion length,
``mask_BT`` 1 on real tokens; padding is read through ``torch.where``. Advantages need the
whole batch (global whitening): compute them where the whole batch is (the learner), then
shard; :func:`policy_loss` takes the minibatch's normalisers so shard losses add up.
"""

from __future__ import annotations

import torch

from marl_ray.algorithms import ppo
from marl_ray.algorithms import grpo


def token_rewards(
    scores_B: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - ref) on every real token, score on the last one.

    scores_B: (B,); logprobs_BT (the rollout policy's), ref_logprobs_BT, mask_BT: (B, T).
    Returns (rewards_BT, kl_BT), both 0 on padding; a row with an empty mask gets nothing.
    The same as :func:`marl_ray.algorithms.ppo.rewards_with_kl` with the k1 ("kl") estimator.
    """
    return ppo.rewards_with_kl(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, kl_coef, kind="kl")


@torch.no_grad()
def returns(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go over each row's real tokens: G_t = r_t + gamma * G_next.

    rewards_BT, mask_BT: (B, T). Padding (right, left or holes) is skipped: the "next"
    token is the next *real* one, and the episode ends after the last real token. Returns
    (B, T) float32, 0 on padding. gamma = 1 is a reverse cumulative sum.
    """
    keep_BT = mask_BT.bool()
    zeros_BT = torch.zeros_like(rewards_BT, dtype=torch.float32)
    rewards_BT = torch.where(keep_BT, rewards_BT.float(), zeros_BT)
    if gamma == 1.0:
        returns_BT = rewards_BT.flip(-1).cumsum(-1).flip(-1)
    else:
        returns_BT = torch.zeros_like(zeros_BT)
        next_B = rewards_BT.new_zeros(rewards_BT.shape[0])
        for t in reversed(range(rewards_BT.shape[-1])):
            ret_B = rewards_BT[:, t] + gamma * next_B
            returns_BT[:, t] = ret_B
            next_B = torch.where(keep_BT[:, t], ret_B, next_B)
    return torch.where(keep_BT, returns_BT, zeros_BT)


@torch.no_grad()
def returns_reference(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Readable per-row reference for :func:`returns` (same arguments, same result); slow."""
    B, T = rewards_BT.shape
    out_BT = torch.zeros(B, T, dtype=torch.float32)
    for b in range(B):
        idx = [t for t in range(T) if mask_BT[b, t] != 0]
        ret = 0.0
        for t in reversed(idx):
            ret = float(rewards_BT[b, t]) + gamma * ret
            out_BT[b, t] = ret
    return out_BT.to(rewards_BT.device)


@torch.no_grad()
def advantages(returns_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Returns whitened over all real tokens of the batch: (G - mean) / sqrt(var + 1e-8).

    returns_BT, mask_BT: (B, T) of the *whole* batch. One masked mean and unbiased masked
    variance over every real token (:func:`marl_ray.algorithms.ppo.masked_whiten`). Returns
    (B, T), 0 on padding.
    """
    return ppo.masked_whiten(returns_BT, mask_BT)


@torch.no_grad()
def compute_advantages(
    scores_B: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_rewards -> returns -> advantages for a whole batch.

    Arguments as in :func:`token_rewards`. Returns (advantages_BT, returns_BT, kl_BT).
    """
    rewards_BT, kl_BT = token_rewards(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, kl_coef)
    returns_BT = returns(rewards_BT, mask_BT, gamma)
    return advantages(returns_BT, mask_BT), returns_BT, kl_BT


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    *,
    loss_type: str = "dapo",
    n_seqs: int | torch.Tensor | None = None,
    n_tokens: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate on (B, T) advantages, this shard's share of the minibatch loss.

    logprobs_BT (carries grad), old_logprobs_BT, advantages_BT, mask_BT: (B, T) rows of
    this shard; the normalisers are the whole minibatch's, as in
    :func:`marl_ray.algorithms.grpo.aggregate`. The default ``"dapo"`` is the token
    mean over the minibatch (OpenRLHF's REINFORCE++); it needs ``n_tokens``. Returns
    (0-dim loss, stats) with the summable stats of ``grpo.per_token_loss``.

    :func:`marl_ray.algorithms.ppo.policy_loss` computes the same surrogate but as a mean over
    the tokens it is given, which is not additive over shards; hence this wrapper.
    """
    loss_BT, stats = grpo.per_token_loss(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                                         epsilon_low, epsilon_high)
    loss = grpo.aggregate(loss_BT, mask_BT, loss_type, n_seqs=n_seqs, n_tokens=n_tokens, max_len=max_len)
    return loss, stats
