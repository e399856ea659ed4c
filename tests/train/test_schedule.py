"""Each policy's learning-rate schedule (constant, linear, cosine; warm-up) and weight decay.

The schedule counts optimizer steps, over the run's ppo.steps x ppo_epochs x minibatches per step (as
transformers' get_scheduler in TRL's trainers). Expected learning rates come from the closed forms
below, and the expected weights from AdamW's update written out here; the host's optimizer is what
is checked against them. A snapshot restored (a step redone), a peer's copy and checkpoint files
carry the schedule: the steps after them use the learning rates of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import reliability_utils as ru
from marl_ray.config import ConfigError

LR = 1e-2


def linear(k: int, total: int, warmup: int) -> float:
    """The learning-rate factor of optimizer step k (0-based): warm-up from 0, then down to 0 at `total`."""
    if k < warmup:
        return k / warmup
    return max(0.0, (total - k) / (total - warmup))


def cosine(k: int, total: int, warmup: int) -> float:
    if k < warmup:
        return k / warmup
    return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ru.build_assets(tmp_path_factory.mktemp("schedule_assets"))


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("policy, field, words", [
    ({"lr_scheduler_type": "polynomial"}, "policies[0].lr_scheduler_type", "not one of constant, linear, cosine"),
    ({"warmup_ratio": 1.5}, "policies[0].warmup_ratio", "must be >= 0 and <= 1"),
    ({"warmup_ratio": -0.1}, "policies[0].warmup_ratio", "must be >= 0 and <= 1"),
    ({"warmup_ratio": 0.1, "warmup_steps": 3}, "policies[0].warmup_steps", "both set"),
    ({"weight_decay": -0.01}, "policies[0].weight_decay", "must be >= 0"),
])
def test_bad_schedule_settings_are_config_errors_naming_the_field(tmp_path, policy, field, words):
    cfg = ru.run_config({"base": "b", "reward": "r", "prompts": "p.jsonl"}, tmp_path)
    cfg["policies"][0].update(policy)
    with pytest.raises(ConfigError) as e:
        ru.load(cfg)
    assert str(e.value).startswith(field) and words in str(e.value), str(e.value)


def test_optimizer_steps_count_epochs_and_minibatches(tmp_path):
    cfg = ru.load(ru.run_config({"base": "b", "reward": "r", "prompts": "p.jsonl"}, tmp_path,
                                ppo={"steps": 5, "batch_size": 8, "mini_batch_size": 2, "ppo_epochs": 3}))
    assert cfg.ppo.optimizer_steps == 5 * 3 * 4


# ---------------------------------------------------------------------------- the host's optimizer
def _host(assets, tmp_path, total: int, **policy):
    from marl_ray.runtime.host import ModelHost

    cfg = ru.load(ru.run_config(assets, tmp_path, policies=("up",)))
    spec = dataclasses.replace(cfg.policies[0], lr=LR, **policy)
    return ModelHost(cfg.model, cfg.rewards, (spec,), cfg.generation, seed=0, optimizer_steps=total)


def _grads(host, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return {n: torch.randn(p.shape, generator=gen) for n, p in host.trainers["up"].params.items()}


def _adamw(params: dict, grads: list[dict], lrs: list[float], wd: float) -> dict:
    """AdamW (beta 0.9, 0.999, eps 1e-8; decoupled decay, none on biases) written out, in float64."""
    p = {k: v.detach().double().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for k in p:
            gk = g[k].double()
            if not k.endswith("bias"):
                p[k] *= 1 - lr * wd
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.999 * v2[k] + 0.001 * gk * gk
            denom = v2[k].sqrt() / math.sqrt(1 - 0.999 ** t) + 1e-8
            p[k] -= lr * (m[k] / (1 - 0.9 ** t)) / denom
    return p


@pytest.mark.parametrize("kind, warmup, wd", [("linear", {"warmup_steps": 2}, 0.1),
                                              ("cosine", {"warmup_ratio": 0.25}, 0.0),
                                              ("constant", {"warmup_steps": 3}, 0.5)])
def test_each_optimizer_step_uses_the_scheduled_lr_and_adamw_decay(assets, tmp_path, kind, warmup, wd):
    total = 8
    host = _host(assets, tmp_path, total, lr_scheduler_type=kind, weight_decay=wd, **warmup)
    n_warm = warmup.get("warmup_steps") or math.ceil(total * warmup.get("warmup_ratio", 0))
    factor = {"linear": linear, "cosine": cosine,
              "constant": lambda k, total, warmup: min(1.0, k / warmup)}[kind]
    want_lrs = [LR * factor(k, total, n_warm) for k in range(total + 2)]  # past the total too
    start = {k: v.detach().clone() for k, v in host.trainers["up"].params.items()}
    assert any(k.endswith("bias") for k in start), "the value head's bias (no decay) is among the tensors"
    grads, got = [], []
    for k in range(total + 2):
        grads.append(_grads(host, k))
        host.optim_step("up", grads[-1], None)
        got.append(host.lrs(["up"])["up"])
    assert got == pytest.approx(want_lrs, rel=1e-12, abs=1e-15)
    assert got[0] == 0.0 and max(got) == pytest.approx(LR)
    want = _adamw(start, grads, want_lrs, wd)
    for k, v in host.trainers["up"].params.items():
        torch.testing.assert_close(v.detach().double(), want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_weight_decay_shrinks_the_weights_by_lr_times_decay(assets, tmp_path):
    """With zero gradients AdamW's only change is the decay: w <- w (1 - lr wd), biases untouched."""
    host = _host(assets, tmp_path, 4, weight_decay=0.3)
    before = {k: v.detach().clone() for k, v in host.trainers["up"].params.items()}
    host.optim_step("up", {k: torch.zeros_like(v) for k, v in before.items()}, None)
    for k, v in host.trainers["up"].params.items():
        torch.testing.assert_close(v.detach(), before[k] if k.endswith("bias") else before[k] * (1 - LR * 0.3),
                                   rtol=0, atol=1e-9, msg=k)


def test_the_defaults_are_plain_adamw_bit_for_bit(assets, tmp_path):
    host = _host(assets, tmp_path, 6)
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in host.trainers["up"].params.items()}
    plain = torch.optim.AdamW(list(params.values()), lr=LR, eps=1e-8, weight_decay=0.0, foreach=True)
    for k in range(4):
        g = _grads(host, k)
        host.optim_step("up", g, None)
        for n, p in params.items():
            p.grad = g[n]
        plain.step()
        assert host.lrs(["up"])["up"] == LR
    for n, v in host.trainers["up"].params.items():
        assert torch.equal(v.detach(), params[n].detach()), n


def test_a_redone_step_a_peer_copy_and_checkpoint_files_continue_the_schedule(assets, tmp_path):
    total = 6
    host = _host(assets, tmp_path, total, lr_scheduler_type="linear", warmup_steps=2)
    for k in range(3):
        host.optim_step("up", _grads(host, k), None)
    host.snapshot(1)
    files = host.export_policy("up")
    ahead = []
    for k in range(3, 6):
        host.optim_step("up", _grads(host, k), None)
        ahead.append(host.lrs(["up"])["up"])
    end = host.checksum("up")
    assert ahead == pytest.approx([LR * linear(k, total, 2) for k in range(3, 6)], rel=1e-12)

    def redo(h):
        lrs = []
        for k in range(3, 6):
            h.optim_step("up", _grads(h, k), None)
            lrs.append(h.lrs(["up"])["up"])
        assert lrs == ahead and h.checksum("up") == end

    host.restore(1)  # the step is redone after a recovery
    redo(host)
    fresh = _host(assets, tmp_path, total, lr_scheduler_type="linear", warmup_steps=2)  # a restarted host
    fresh.restore_from(host.share_snapshot(1, by_reference=False), 1)
    redo(fresh)
    resumed = _host(assets, tmp_path, total, lr_scheduler_type="linear", warmup_steps=2)  # --resume
    resumed.import_policy("up", files)
    redo(resumed)


# ---------------------------------------------------------------------------- a run's metrics
def test_a_run_logs_the_lr_each_policy_used(assets, tmp_path):
    """Two policies with their own schedules, 3 steps of 2 minibatches x 2 epochs: each step's `lr` is
    the one of the policy's last update in it (optimizer step 4 s + 3)."""
    from marl_ray.stages.ppo import run_ppo

    cfg = ru.run_config(assets, tmp_path / "run", ppo={"steps": 3, "ppo_epochs": 2}, run={"save_every": 0})
    cfg["policies"][0].update(lr_scheduler_type="linear", warmup_steps=3)
    cfg["policies"][1].update(lr_scheduler_type="cosine", warmup_ratio=0.5, weight_decay=0.01)
    run_ppo(ru.load(cfg))
    got = {(k[0], k[1]): m["lr"] for k, m in ru.metrics_by_step(tmp_path / "run").items()}
    total = 3 * 2 * 2
    for s in range(3):
        assert got[(s, "up")] == pytest.approx(1e-3 * linear(4 * s + 3, total, 3), rel=1e-12)
        assert got[(s, "down")] == pytest.approx(1e-3 * cosine(4 * s + 3, total, 6), rel=1e-12)
