"""PPO math for language models: pure torch functions, no I/O.

Shape suffixes: B = batch, T = response length, V = vocab. ``mask_BT`` is a float or
bool tensor, 1 on real response tokens and 0 on padding. Every masked function reads
its inputs through ``torch.where`` rather than multiplying by the mask, so whatever sits
under masked positions (garbage, inf, nan) cannot reach real positions or the loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_KL_KINDS = ("kl", "abs", "mse")


def logprobs_from_logits(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under its logits.

    logits_BTV: (B, T, V), any float dtype; tokens_BT: (B, T) int64. Returns (B, T) float32.
    """
    # bf16 log_softmax loses ~2 digits, enough to bias the PPO ratio.
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logp_BTV.gather(-1, tokens_BT.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    logits_BTV: (B, T, V). Returns (B, T) float32.
    """
    logits_BTV = logits_BTV.float()
    probs_BTV = torch.softmax(logits_BTV, dim=-1)
    # H = logsumexp(z) - sum_v p_v z_v, stable for large logits.
    return torch.logsumexp(logits_BTV, dim=-1) - (probs_BTV * logits_BTV).sum(dim=-1)


def _keep(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() if mask.dtype != torch.bool else mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is nonzero.

    x, mask: same (broadcastable) shape, e.g. (B, T). dim=None sums everything (0-dim
    result); otherwise sums over ``dim``.
    """
    kept = torch.where(_keep(mask), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero.

    x, mask: e.g. (B, T). dim=None gives a 0-dim mean over all kept entries; ``dim=1``
    gives (B,). An empty mask (or empty row) yields 0 rather than nan.
    """
    keep = _keep(mask).expand_as(x)
    count = keep.sum() if dim is None else keep.sum(dim=dim)
    return masked_sum(x, keep, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over kept positions (0-dim), TRL semantics.

    x, mask: e.g. (B, T). ``unbiased`` applies Bessel's correction n/(n-1); with fewer than
    two kept entries the correction is skipped (the variance is then 0).
    """
    keep = _keep(mask).expand_as(x)
    mean = masked_mean(x, keep)
    var = masked_mean((x - mean) ** 2, keep)
    if unbiased:
        n = keep.sum().to(x.dtype)
        var = var * (n / (n - 1).clamp(min=1)).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over kept positions.

    x, mask: e.g. (B, T). Returns the same shape; masked positions are set to 0.
    """
    keep = _keep(mask).expand_as(x)
    mean = masked_mean(x, keep)
    var = masked_var(x, keep)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate between policy and reference from sampled-token logprobs.

    logprobs_BT, ref_logprobs_BT: (B, T). kind: "kl" (lp - ref, the unbiased k1
    estimator), "abs" (|lp - ref|) or "mse" (0.5 * (lp - ref)^2). Returns (B, T).
    """
    diff_BT = logprobs_BT - ref_logprobs_BT
    if kind == "kl":
        return diff_BT
    if kind == "abs":
        return diff_BT.abs()
    if kind == "mse":
        return 0.5 * diff_BT.square()
    raise ValueError(f"unknown kl kind {kind!r}; valid kinds: {', '.join(_KL_KINDS)}")


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, -1 for a row with an empty mask.

    mask_BT: (B, T). Returns (B,) int64. Works for right and left padding.
    """
    T = mask_BT.shape[-1]
    pos_BT = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    return torch.where(_keep(mask_BT), pos_BT, torch.full_like(pos_BT, -1)).max(dim=-1).values


def rewards_with_kl(
    scores_B: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kind: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-token rewards: -kl_coef * KL on every real token, score on the last one.

    scores_B: (B,) sequence-level reward; logprobs_BT, ref_logprobs_BT, mask_BT: (B, T).
    Returns (rewards_BT, kl_BT), both zero on padding. A row with an empty mask gets
    neither KL nor score.
    """
    keep_BT = _keep(mask_BT)
    kl_BT = kl_penalty(logprobs_BT, ref_logprobs_BT, kind)
    kl_BT = torch.where(keep_BT, kl_BT, torch.zeros_like(kl_BT))
    rewards_BT = -kl_coef * kl_BT
    last_B = last_token_index(mask_BT)
    pos_BT = torch.arange(mask_BT.shape[-1], device=mask_BT.device).expand_as(keep_BT)
    # last_B == -1 never matches a position, so empty rows get no score.
    is_last_BT = pos_BT == last_B.unsqueeze(-1)
    score_BT = scores_B.to(rewards_BT.dtype).unsqueeze(-1).expand_as(rewards_BT)
    rewards_BT = rewards_BT + torch.where(is_last_BT, score_BT, torch.zeros_like(score_BT))
    return rewards_BT, kl_BT


@torch.no_grad()
def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over B with one reverse loop over T.

    rewards_BT, values_BT, mask_BT: (B, T). The real tokens of a row (mask 1) form one
    episode that ends after its last real token (bootstrap value 0); masked positions are
    skipped entirely, so right padding, left padding and holes all work and nothing under
    the mask can leak in. Returns (advantages_BT, returns_BT) in float32, 0 on padding,
    returns = advantages + values. Computed without grad: these are regression targets.
    """
    keep_BT = _keep(mask_BT)
    zeros_BT = torch.zeros_like(rewards_BT, dtype=torch.float32)
    rewards_BT = torch.where(keep_BT, rewards_BT.float(), zeros_BT)
    values_BT = torch.where(keep_BT, values_BT.float(), zeros_BT)
    B, T = rewards_BT.shape
    advantages_BT = torch.zeros_like(zeros_BT)
    # State carried from the next *real* token; untouched while crossing padding.
    next_value_B = rewards_BT.new_zeros(B)
    next_adv_B = rewards_BT.new_zeros(B)
    for t in reversed(range(T)):
        keep_B = keep_BT[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        adv_B = delta_B + gamma * lam * next_adv_B
        advantages_BT[:, t] = torch.where(keep_B, adv_B, 0.0)
        next_adv_B = torch.where(keep_B, adv_B, next_adv_B)
        next_value_B = torch.where(keep_B, values_BT[:, t], next_value_B)
    returns_BT = torch.where(keep_BT, advantages_BT + values_BT, zeros_BT)
    return advantages_BT, returns_BT


@torch.no_grad()
def gae_reference(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable per-row reference for :func:`gae` (same arguments, same result); slow.

    For each row: pick out the real tokens, run textbook GAE on that episode with a
    terminal after its last token, and write the results back; padding stays 0.
    """
    B, T = rewards_BT.shape
    advantages_BT = torch.zeros(B, T, dtype=torch.float32)
    returns_BT = torch.zeros(B, T, dtype=torch.float32)
    for b in range(B):
        idx = [t for t in range(T) if mask_BT[b, t] != 0]
        r = [float(rewards_BT[b, t]) for t in idx]
        v = [float(values_BT[b, t]) for t in idx]
        adv = [0.0] * len(idx)
        last = 0.0
        for i in reversed(range(len(idx))):
            next_v = v[i + 1] if i + 1 < len(idx) else 0.0
            delta = r[i] + gamma * next_v - v[i]
            last = delta + gamma * lam * last
            adv[i] = last
        for i, t in enumerate(idx):
            advantages_BT[b, t] = adv[i]
            returns_BT[b, t] = adv[i] + v[i]
    return advantages_BT.to(rewards_BT.device), returns_BT.to(rewards_BT.device)


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, masked mean over real tokens.

    logprobs_BT: (B, T) current policy (carries grad); old_logprobs_BT, advantages_BT,
    mask_BT: (B, T). Returns (0-dim loss, stats) with detached 0-dim stats ``clipfrac``
    (fraction of tokens where the clipped term is active), ``approxkl``
    (0.5 * mean((lp - old)^2)) and ``ratio_mean``.
    """
    keep_BT = _keep(mask_BT)
    # Zero padding before exp so inf/nan there cannot poison the forward or the grads.
    log_ratio_BT = torch.where(keep_BT, logprobs_BT - old_logprobs_BT, torch.zeros_like(logprobs_BT))
    adv_BT = torch.where(keep_BT, advantages_BT, torch.zeros_like(advantages_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    pg_unclipped_BT = -adv_BT * ratio_BT
    pg_clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg_unclipped_BT, pg_clipped_BT), keep_BT)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped_BT > pg_unclipped_BT).float(), keep_BT),
            "approxkl": 0.5 * masked_mean(log_ratio_BT.square(), keep_BT),
            "ratio_mean": masked_mean(ratio_BT, keep_BT),
        }
    return loss, stats


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), masked mean.

    values_BT: (B, T) current value head (carries grad); old_values_BT, returns_BT,
    mask_BT: (B, T). v_clip = old + clamp(v - old, -c, c). Returns (0-dim loss, stats)
    with detached ``vf_clipfrac`` (fraction of tokens where the clipped term wins).
    """
    keep_BT = _keep(mask_BT)
    zeros_BT = torch.zeros_like(values_BT)
    values_BT = torch.where(keep_BT, values_BT, zeros_BT)
    old_values_BT = torch.where(keep_BT, old_values_BT, zeros_BT)
    returns_BT = torch.where(keep_BT, returns_BT, zeros_BT)
    clipped_BT = old_values_BT + torch.clamp(values_BT - old_values_BT, -cliprange_value, cliprange_value)
    vf_unclipped_BT = (values_BT - returns_BT).square()
    vf_clipped_BT = (clipped_BT - returns_BT).square()
    loss = 0.5 * masked_mean(torch.maximum(vf_unclipped_BT, vf_clipped_BT), keep_BT)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_clipped_BT > vf_unclipped_BT).float(), keep_BT)}
    return loss, stats


class AdaptiveKLController:
    """Proportional KL-coefficient controller (Ziegler et al. 2019).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=}, {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move ``value`` toward keeping ``current_kl`` at ``target``; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        if math.isfinite(error):
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the fixed value."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
