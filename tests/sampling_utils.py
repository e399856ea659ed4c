"""What a sampling setting means, computed from the logits: the reference both rollout backends
(HF generate on the training model, the vLLM engine) are checked against."""

from __future__ import annotations

import torch


def expected_distribution(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Next-token probabilities (V,) under temperature, then top-k (0 = off), then top-p (1 = off):
    the smallest set of most likely tokens whose mass reaches top_p (the token that crosses it is kept)."""
    probs = torch.softmax(logits_V.double() / temperature, -1)
    if top_k:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def chi_square(tokens: list[int], expected_V: torch.Tensor, min_count: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic of the sample counts against `expected_V` (tokens expected fewer than
    `min_count` times share one bin) and its degrees of freedom."""
    n = len(tokens)
    observed = torch.bincount(torch.tensor(tokens), minlength=expected_V.numel()).double()
    exp = expected_V * n
    big = exp >= min_count
    o, e = observed[big], exp[big]
    if (~big).any() and exp[~big].sum() > 0:
        o = torch.cat([o, observed[~big].sum().reshape(1)])
        e = torch.cat([e, exp[~big].sum().reshape(1)])
    return float(((o - e) ** 2 / e).sum()), int(o.numel() - 1)


def check_samples(tokens: list[int], expected_V: torch.Tensor, sigmas: float = 5.0) -> float:
    """Every sample inside the set the setting allows, and the counts consistent with the expected
    distribution: Pearson's chi-square below df + `sigmas` * sqrt(2 df) (its normal approximation)."""
    outside = sorted({t for t in tokens if expected_V[t] == 0})
    assert not outside, f"sampled tokens that the setting excludes: {outside[:10]}"
    chi2, df = chi_square(tokens, expected_V)
    limit = df + sigmas * (2 * df) ** 0.5
    assert chi2 < limit, f"sample counts do not fit the expected distribution: chi2 {chi2:.0f} > {limit:.0f} (df {df})"
    return chi2
