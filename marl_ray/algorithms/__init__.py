"""The algorithms as pure functions of tensors: no Ray, no torch.distributed, no I/O.

``ppo`` (logprobs and entropies from logits, masked statistics, GAE, the clipped surrogate and value
losses, KL controllers), ``grpo`` (the GRPO family: group advantages, per-token loss, its
aggregations), ``rloo``, ``reinforce_pp``, ``advantages`` (one policy's rows to its advantages, per
algorithm) and ``rewards`` (several rewards to one total, as TRL combines them). Everything above
reads them: the model's passes, the hosts' losses, the learner's advantages.

The registry below says which model parts and which batch layout each algorithm needs. ``critic``:
the policy gets a value head and GAE (only PPO). ``groups``: rows come in groups of
``num_generations`` >= 2 completions per prompt, sharing a group id.
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
