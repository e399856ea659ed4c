"""Seeds of the random streams that belong to one policy.

A policy's own draws (its LoRA initialisation, the order its rows are dealt into minibatches) come
from a seed made of the run's seed and the policy's *name*, never its position in `policies`: the
same policy draws the same numbers whether it trains alone or beside others, whichever its place.
"""

from __future__ import annotations

import zlib


def policy_seed(run_seed: int, policy: str, *salt: int | str) -> int:
    """A 63-bit seed for policy `policy`'s stream `salt` (e.g. "order", step) in a run seeded `run_seed`."""
    key = ":".join(str(x) for x in (run_seed, policy, *salt)).encode()
    return (zlib.crc32(key) << 31 | zlib.crc32(key[::-1]) >> 1) & (2**63 - 1)
