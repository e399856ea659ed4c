"""A policy trained beside a policy of another algorithm takes the updates it takes alone.

For every pair of algorithms (ppo, grpo, rloo, reinforce_pp, a pair of one algorithm included) a
mixed run trains policy "x" (the first) beside policy "y" (the second) on the one base, and each
policy is also trained alone. The solo runs are fed the rollout rows the mixed run sampled (the
hosts' sampler replays them: in a shared decode a policy's rows draw other random numbers than
alone, which is the one thing a mixed run may change), and everything else is the real code path:
scoring, reward functions, advantages, the minibatch order, losses, gradients and AdamW. After two
steps each policy's weights equal, to float rounding, its weights after the solo run; so do its
step metrics. One host, and two hosts (each keeping the rows it sampled, gradients summed).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import reliability_utils as ru

FNS = Path(__file__).parent / "reward_fns" / "vowels.py"
ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
#: Each algorithm as a policy: the group ones with G completions per prompt; rloo also reads the
#: reference (beta > 0), so the scoring pass has reference rows for some policies and not others.
SPECS = {
    "ppo": {"algorithm": "ppo"},
    "grpo": {"algorithm": "grpo", "num_generations": 3, "loss_type": "grpo"},
    "rloo": {"algorithm": "rloo", "num_generations": 2, "beta": 0.04},
    "reinforce_pp": {"algorithm": "reinforce_pp"},
}


class Recorder:
    """The host's sampler, recording each row it answers: (seed, prompt, policy, k-th such row) -> the row."""

    def __init__(self, inner, book: dict):
        self.inner, self.book, self.name = inner, book, f"recorded {inner.name}"

    def sample(self, model, prompts, policies, settings, seed):
        out = self.inner.sample(model, prompts, policies, settings, seed)
        seen: dict = {}
        for i, (p, pol) in enumerate(zip(prompts, policies)):
            key = (seed, tuple(p), pol)
            k = seen[key] = seen.get(key, -1) + 1
            scores = None if out.scores is None else tuple(getattr(out.scores, f)[i] for f in out.scores.FIELDS)
            self.book[(*key, k)] = (out.responses[i], out.response_mask[i], scores)
        return out


class Replay:
    """A sampler that answers each row with the row a Recorder recorded for it."""

    name = "replay"

    def __init__(self, book: dict):
        self.book = book

    def sample(self, model, prompts, policies, settings, seed):
        from marl_ray.model.passes import RolloutScores
        from marl_ray.model.sampling import Samples

        seen: dict = {}
        rows = []
        for p, pol in zip(prompts, policies):
            key = (seed, tuple(p), pol)
            k = seen[key] = seen.get(key, -1) + 1
            rows.append(self.book[(*key, k)])
        scores = None
        if all(r[2] is not None for r in rows):
            scores = RolloutScores(*(torch.stack([r[2][j] for r in rows]) for j in range(len(RolloutScores.FIELDS))))
        return Samples(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), scores)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ru.build_assets(tmp_path_factory.mktemp("mixed_assets"))


def _config(assets, out, policies: dict[str, str]):
    cfg = ru.run_config(assets, out, ppo={"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2})
    cfg["rewards"] = [{"name": "vowels", "function": f"{FNS}:vowel_fraction"}]
    cfg["policies"] = [{"name": n, "reward": "vowels", "lr": 5e-3, "lora": {"r": 4, "alpha": 8}, **SPECS[a]}
                       for n, a in policies.items()]
    return ru.load(cfg)


def _run(cfg, hosts: int, sampler):
    """Two steps of a learner over `hosts` in-process hosts; sampler(host) replaces each host's sampler."""
    from marl_ray.runtime.handles import LocalHandle
    from marl_ray.runtime.host import ModelHost
    from marl_ray.runtime.placement import start_inprocess
    from marl_ray.train.loop import Learner

    actors = start_inprocess(cfg, seed=0)
    handles = list(actors.hosts) + [
        LocalHandle(ModelHost(cfg.model, cfg.rewards, cfg.policies, cfg.generation, seed=0, host_index=i))
        for i in range(1, hosts)]
    for h in handles:
        h._obj.sampler = sampler(h._obj.sampler)
    learner = Learner(cfg, handles, actors.workers, [w % hosts for w in range(len(actors.workers))])
    start = {p: handles[0]._obj.checksum(p) for p in learner.policies}
    metrics = [learner.run_step() for _ in range(2)]
    assert all(handles[0]._obj.checksum(p) != start[p] for p in learner.policies), "every policy trained"
    weights = {p: {k: v.detach().clone() for k, v in handles[0]._obj.model.policy_state(p).items()}
               for p in learner.policies}
    for h in handles[1:]:  # the replicas agree
        assert all(h._obj.checksum(p) == handles[0]._obj.checksum(p) for p in learner.policies)
    return weights, metrics


def _same(got, want, what):
    for k in want:
        scale = float(want[k].abs().max()) or 1.0
        diff = float((got[k] - want[k]).abs().max())
        assert diff <= 1e-5 * scale, f"{what}: {k} differs by {diff:.3g} (max |w| {scale:.3g})"


PAIRS = list(itertools.combinations_with_replacement(ALGORITHMS, 2))


@pytest.mark.parametrize("hosts", [1, 2])
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_a_policys_update_beside_another_equals_its_update_alone(assets, tmp_path, pair, hosts):
    book: dict = {}
    mixed_w, mixed_m = _run(_config(assets, tmp_path / "mixed", {"x": pair[0], "y": pair[1]}), hosts,
                            lambda inner: Recorder(inner, book))
    for name, alg in (("x", pair[0]), ("y", pair[1])):
        solo_w, solo_m = _run(_config(assets, tmp_path / name, {name: alg}), hosts, lambda inner: Replay(book))
        _same(mixed_w[name], solo_w[name], f"{alg} policy {name} beside {pair[1] if name == 'x' else pair[0]}")
        for step, (m, s) in enumerate(zip(mixed_m, solo_m)):
            for k, v in s[name].items():
                if k.startswith(ru.VOLATILE):
                    continue
                assert m[name][k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"step {step}, {name} ({alg}): {k}"
