"""A policy's trainer on a model host: its loss and gradients, its optimizer, its state and snapshots.

One `PolicyTrainer` per policy, over the host's shared model (the policy's LoRA adapter and, for PPO,
its value head). The losses come from the algorithm layer (`marl_ray.algorithms`); a shard's loss is
scaled by the whole minibatch's normalisers, so the hosts' gradients add up to the minibatch's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from marl_ray.algorithms import grpo, ppo
from marl_ray.model.adapter_io import ADAPTER_WEIGHTS, VALUE_HEAD_FILE
from marl_ray.runtime.protocol import Gradients, LossSettings, Minibatch, PolicyState

PPO_STATS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac", "policy/entropy",
             "val/ratio")
CRITIC_FREE_STATS = ("loss/policy", "policy/entropy", "policy/clipfrac", "policy/clipfrac_low",
                     "policy/clipfrac_high", "val/ratio")
#: Snapshots a trainer keeps: the step's start, and the one before until the step is known to be good.
KEEP_SNAPSHOTS = 2
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SnapshotMissing(RuntimeError):
    """A host was asked for a snapshot it does not hold (it was restarted since it was taken)."""


def stat_keys(loss: LossSettings) -> list[str]:
    """The statistics a shard's update reports, sorted: the same layout on every host, also on one
    without rows."""
    if loss.algorithm == "ppo":
        return sorted(PPO_STATS)
    # the learner sends reference logprobs exactly when beta > 0
    return sorted(CRITIC_FREE_STATS + (("policy/kl_k3",) if loss.beta > 0 else ()))


#: The learning-rate schedule's state travels inside the optimizer's state dict under this key (snapshots,
#: peers' copies, checkpoint files' optimizer.pt): weights, moments and schedule are restored together.
SCHEDULE_KEY = "lr_scheduler"
SCHEDULES = ("constant", "linear", "cosine")


def warmup_of(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up optimizer steps: warmup_steps, or ceil(warmup_ratio x total_steps) (as transformers)."""
    return int(warmup_steps) if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


class PolicyTrainer:
    """A policy's AdamW (eps 1e-8) with a learning-rate schedule over its optimizer steps.

    lr_scheduler_type constant, linear or cosine (transformers' `get_scheduler`; constant with a
    warm-up is its constant_with_warmup), with `warmup` steps of linear warm-up from 0, over
    `total_steps` optimizer steps (needed by linear and cosine). weight_decay: AdamW's decoupled decay,
    on every trainable tensor but biases (as transformers' Trainer). The defaults (constant, no warm-up,
    no decay) give the plain AdamW update, bit for bit."""

    def __init__(self, model, name: str, lr: float, weight_decay: float = 0.0, lr_scheduler_type: str = "constant",
                 warmup: int = 0, total_steps: int | None = None):
        from transformers import get_scheduler

        if lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"policy {name!r}: lr_scheduler_type {lr_scheduler_type!r} is not one of {SCHEDULES}")
        if lr_scheduler_type != "constant" and not total_steps:
            raise ValueError(f"policy {name!r}: a {lr_scheduler_type} schedule needs the run's optimizer steps")
        self.model, self.name = model, name
        params = model.policy_state(name)
        decay = [p for k, p in params.items() if not k.endswith("bias")]
        groups = ([{"params": decay, "weight_decay": weight_decay},
                   {"params": [p for k, p in params.items() if k.endswith("bias")], "weight_decay": 0.0}]
                  if weight_decay and len(decay) < len(params) else [{"params": list(params.values())}])
        self.optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-8, weight_decay=weight_decay)
        kind = "constant_with_warmup" if lr_scheduler_type == "constant" else lr_scheduler_type
        self.scheduler = get_scheduler(kind, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=total_steps)
        self.last_lr: float | None = None  # the learning rate of the latest optimizer step
        self.snapshots: dict[int, PolicyState] = {}  # step -> the state at its start

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.model.policy_state(self.name)

    # ------------------------------------------------------------ gradients
    def gradients(self, mb: Minibatch | None, total_tokens: float, loss: LossSettings) -> Gradients:
        """This shard's gradients (on the model's device) and statistics, in chunks of
        loss.micro_batch_size rows, summed; zeros when the shard has no rows (it still takes part in
        the sums)."""
        keys = stat_keys(loss)
        if mb is None or not len(mb):
            return Gradients({k: torch.zeros_like(p) for k, p in self.params.items()}, {k: 0.0 for k in keys})
        n = len(mb)
        step = loss.micro_batch_size or n
        trainable = self.params
        grads, stats = None, None
        for lo in range(0, n, step):
            g, s = self._forward_backward(trainable, mb.chunk(lo, lo + step), total_tokens, loss)
            grads = g if grads is None else {k: grads[k].add_(g[k]) for k in grads}
            stats = s if stats is None else {k: stats[k] + s[k] for k in stats}
        if set(stats) != set(keys):
            raise RuntimeError(f"statistics {sorted(stats)} are not the expected {keys}")
        return Gradients({k: g.detach() for k, g in grads.items()}, stats)

    def _forward_backward(self, trainable: dict, mb: Minibatch, total_tokens: float, cfg: LossSettings):
        dev = self.model.device
        mask = mb.mask.to(dev).float()
        logprobs, values, entropy_BR = self.model.policy_pass(
            self.name, mb.input_ids.to(dev), mb.attention_mask.to(dev), mb.response_start)
        if cfg.algorithm != "ppo":
            return self._critic_free(trainable, mb, logprobs, entropy_BR, mask, total_tokens, cfg)
        pg, pg_stats = ppo.policy_loss(logprobs, mb.old_logprobs.to(dev), mb.advantages.to(dev), mask,
                                       cliprange=cfg.cliprange)
        vf, vf_stats = ppo.value_loss(values, mb.old_values.to(dev), mb.returns.to(dev), mask,
                                      cliprange_value=cfg.cliprange_value)
        share = float(mask.sum()) / total_tokens
        grads = _grads((pg + cfg.vf_coef * vf) * share, trainable)
        with torch.no_grad():
            entropy = ppo.masked_mean(entropy_BR, mask)
        pg, vf = pg.detach(), vf.detach()
        stats = {"loss/policy": float(pg) * share, "loss/value": float(vf) * share,
                 "policy/approxkl": float(pg_stats["approxkl"]) * share,
                 "policy/clipfrac": float(pg_stats["clipfrac"]) * share,
                 "val/clipfrac": float(vf_stats["vf_clipfrac"]) * share,
                 "policy/entropy": float(entropy) * share, "val/ratio": float(pg_stats["ratio_mean"]) * share}
        return grads, stats

    def _critic_free(self, trainable: dict, mb: Minibatch, logprobs, entropy_BR, mask, total_tokens: float,
                     cfg: LossSettings):
        """The clipped surrogate of grpo / rloo / reinforce_pp (no value loss), aggregated by loss_type
        over the whole minibatch's normalisers: this shard's share of the minibatch loss."""
        dev = self.model.device
        ref = mb.ref_logprobs.to(dev) if (cfg.beta > 0 and mb.ref_logprobs is not None) else None
        per_token, st = grpo.per_token_loss(logprobs, mb.old_logprobs.to(dev), mb.advantages.to(dev), mask,
                                            cfg.epsilon_low, cfg.epsilon_high, ref_logprobs_BT=ref, beta=cfg.beta)
        loss = grpo.aggregate(per_token, mask, cfg.loss_type, n_seqs=cfg.n_seqs, n_tokens=total_tokens,
                              max_len=cfg.max_len)
        grads = _grads(loss, trainable)
        with torch.no_grad():
            entropy = (entropy_BR * mask).sum()
        # every statistic as this shard's share of the minibatch's token mean: the hosts' shares add up
        stats = {"loss/policy": float(loss.detach()), "policy/entropy": float(entropy) / total_tokens,
                 "policy/clipfrac": float(st["clip_region_sum"]) / total_tokens,
                 "policy/clipfrac_low": float(st["clip_low_sum"]) / total_tokens,
                 "policy/clipfrac_high": float(st["clip_high_sum"]) / total_tokens,
                 "val/ratio": float(st["ratio_sum"]) / total_tokens}
        if ref is not None:
            stats["policy/kl_k3"] = float(st["kl_sum"]) / total_tokens
        return grads, stats

    # ------------------------------------------------------------ the optimizer
    def step(self, grads: dict, max_grad_norm: float | None):
        """One optimizer step from (summed) gradients."""
        params = self.params
        for k, p in params.items():
            p.grad = grads[k].to(p.device, p.dtype)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        for group in self.optimizer.param_groups:
            # torch picks the per-tensor loop on CPU by default; the multi-tensor (foreach) kernels
            # compute the same update (bit for bit) with a fraction of the calls.
            if group.get("foreach") is None and not group.get("fused"):
                group["foreach"] = True
        self.last_lr = self.lr
        self.optimizer.step()
        self.scheduler.step()  # the schedule counts optimizer steps (skipped, non-finite updates do not count)
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with the schedule's state in it (SCHEDULE_KEY); not copied."""
        return {**self.optimizer.state_dict(), SCHEDULE_KEY: self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict):
        """`optimizer_state`'s dict back (one without SCHEDULE_KEY, as files written before schedules,
        leaves the schedule where it is)."""
        state = dict(state)
        schedule = state.pop(SCHEDULE_KEY, None)
        self.optimizer.load_state_dict(state)
        if schedule is not None:
            self.scheduler.load_state_dict(schedule)

    # ------------------------------------------------------------ what it holds
    @torch.no_grad()
    def fingerprint(self) -> str:
        """The trainable tensors reduced where they live (no copy leaves the device): per tensor, in name
        order, the sum of its raw bits read as integers and their sum weighted by position, in wrapping
        int64. Replicas that agree bit for bit agree here; any changed bit changes it (save for a chance
        collision)."""
        acc = []
        for _, v in sorted(self.params.items()):
            t = v.detach().contiguous().reshape(-1)
            bits = t.view(_INT_OF_SIZE[t.element_size()]).long()
            pos = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64).mul_(0x9E3779B1)
            acc.append(torch.stack([bits.sum(), (bits * pos).sum()]))
        return "".join(f"{x & (2**64 - 1):016x}" for x in torch.stack(acc).sum(0).tolist())

    def checksum(self) -> str:
        """sha256 of every trainable tensor (LoRA + value head), in name order."""
        h = hashlib.sha256()
        for k, v in sorted(self.params.items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, folder: str, with_optimizer: bool = True) -> str:
        """A plain peft folder (+ value head) and, beside it, optimizer.pt."""
        folder = Path(folder)
        self.model.save_policy(self.name, folder)
        if with_optimizer:
            tmp = folder / "optimizer.pt.tmp"
            torch.save(self.optimizer_state(), tmp)
            os.replace(tmp, folder / "optimizer.pt")
        return str(folder)

    def files(self) -> dict[str, bytes]:
        """`save`'s files as bytes."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / self.name
            self.save(str(folder))
            return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    def load_files(self, files: dict[str, bytes]) -> str:
        """Weights, value head and optimizer state from `files`; returns the checksum."""
        lora = load_safetensors(files[ADAPTER_WEIGHTS])
        head = load_safetensors(files[VALUE_HEAD_FILE]) if VALUE_HEAD_FILE in files else {}
        with torch.no_grad():
            for k, p in self.params.items():
                if k.startswith("value_head."):
                    src, k_src = head, k[len("value_head."):]
                else:  # peft files name LoRA weights without the adapter name
                    src, k_src = lora, k.replace(f".{self.name}.weight", ".weight")
                if k_src not in src:
                    raise ValueError(f"checkpoint of policy {self.name!r} lacks {k_src}")
                p.copy_(src[k_src])
        if "optimizer.pt" in files:
            self.load_optimizer_state(torch.load(io.BytesIO(files["optimizer.pt"]), map_location="cpu",
                                                 weights_only=False))
        return self.checksum()

    # ------------------------------------------------------------ state and snapshots
    def state(self) -> PolicyState:
        """Weights + optimizer and schedule state (copies: later steps do not change them). Weights in CPU memory
        (pinned on a CUDA host); the optimizer's state where the optimizer keeps it."""
        pin = self.model.device.type == "cuda"
        weights = {}
        for k, v in self.params.items():
            c = v.detach().to("cpu", copy=True)
            weights[k] = c.pin_memory() if pin else c
        return PolicyState(weights, copy.deepcopy(self.optimizer_state()))

    def load_state(self, state: PolicyState):
        """Back to `state`, which stays as it is: the optimizer gets copies of its tensors (load_state_dict
        would adopt them, and the next step would change the snapshot in place)."""
        params = self.params
        with torch.no_grad():
            for k, v in state.weights.items():
                params[k].copy_(v)
        self.load_optimizer_state(copy.deepcopy(state.optimizer))

    def snapshot(self, tag: int, state: PolicyState | None = None):
        """Keep the state as it is now (or `state`) under `tag`; the older beyond KEEP_SNAPSHOTS go."""
        self.snapshots[tag] = self.state() if state is None else state
        for old in sorted(self.snapshots)[:-KEEP_SNAPSHOTS]:
            del self.snapshots[old]

    def held(self, tag: int, host_index: int = 0) -> PolicyState:
        if tag not in self.snapshots:
            raise SnapshotMissing(f"host {host_index} holds no snapshot of step {tag} of policy {self.name!r} "
                                  f"(it holds {sorted(self.snapshots)}: was it restarted?)")
        return self.snapshots[tag]


def _grads(loss: torch.Tensor, trainable: dict) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(trainable.items(), grads)}
