"""Policy-optimisation algorithms: which model parts and which batch layout each one needs.

``critic``: the policy gets a value head and GAE (only PPO). ``groups``: rows come in
groups of ``num_generations`` >= 2 completions per prompt, sharing a group id. The math is
in :mod:`marl_ray.train.ppo` and this package's ``grpo``, ``rloo`` and ``reinforce_pp``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    critic: bool
    groups: bool


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(critic=True, groups=False),
    "grpo": Algorithm(critic=False, groups=True),
    "rloo": Algorithm(critic=False, groups=True),
    "reinforce_pp": Algorithm(critic=False, groups=False),
}
