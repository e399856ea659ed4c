"""Several rewards of a row to one total, as TRL's GRPOTrainer combines them: pure torch, no I/O."""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN with fewer than 2 values (as TRL's)."""
    count = (~torch.isnan(x)).sum()
    if count < 2:
        return torch.tensor(math.nan, dtype=x.dtype, device=x.device)
    mean = torch.nanmean(x)
    return torch.sqrt(torch.nansum((x - mean) ** 2) / (count - 1))


def combine(values: Mapping[str, Union[torch.Tensor, Sequence[float]]],
            weights: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total reward per row and per-reward stats, as TRL 1.16's GRPOTrainer computes them.

    ``values``: reward name -> (B,) scores, NaN = not applicable; ``weights``: the same names -> weight.
    ``total_B = nansum_k(weights[k] * values[k])`` (float32), and NaN on a row where every reward is NaN
    (TRL marks such rows unscorable and gives them advantage 0). Stats: ``rewards/NAME/mean`` and
    ``rewards/NAME/std`` (unweighted, over the non-NaN rows), ``reward`` and ``reward_std`` (of the total,
    over the scorable rows); every std has Bessel's correction and is NaN with fewer than two values.
    """
    if not values:
        raise ValueError("combine: no rewards")
    if set(values) != set(weights):
        extra, lacking = sorted(set(weights) - set(values)), sorted(set(values) - set(weights))
        raise ValueError(f"combine: reward names {sorted(values)} and weight names {sorted(weights)} differ"
                         + (f"; no weight for {lacking}" if lacking else "") + (f"; no values for {extra}" if extra
                                                                                  else ""))
    names = list(values)
    cols = [torch.as_tensor(values[k], dtype=torch.float32) for k in names]
    for k, c in zip(names, cols):
        if c.ndim != 1 or c.shape != cols[0].shape:
            raise ValueError(f"combine: reward {k!r} has shape {tuple(c.shape)}; every reward must be (B,) with "
                             f"B = {cols[0].shape[0] if cols[0].ndim == 1 else '?'}")
    per_BK = torch.stack(cols, dim=1)
    w_K = torch.tensor([float(weights[k]) for k in names], dtype=torch.float32, device=per_BK.device)
    total_B = (per_BK * w_K.unsqueeze(0)).nansum(dim=1)
    total_B[torch.isnan(per_BK).all(dim=1)] = math.nan
    stats: dict[str, float] = {}
    for i, k in enumerate(names):
        stats[f"rewards/{k}/mean"] = torch.nanmean(per_BK[:, i]).item()
        stats[f"rewards/{k}/std"] = nanstd(per_BK[:, i]).item()
    stats["reward"] = torch.nanmean(total_B).item()
    stats["reward_std"] = nanstd(total_B).item()
    return total_B, stats
