"""ModelHost: the one process per node that holds the (quantized) base and every adapter.

A plain class; `placement.py` turns it into a Ray actor. Its interface follows the primitives
Tinker made familiar, each taking the adapter name: `sample`, `evaluate`, `forward_backward`
(LoRA gradients of a minibatch), `optim_step`, `get_state`/`set_state`, `export_policy`/
`import_policy`. Arguments and results are the typed messages of `protocol.py`.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import torch

from marl_ray.model import tweaks
from marl_ray.model.adapter_io import ADAPTER_WEIGHTS, VALUE_HEAD_FILE
from marl_ray.runtime.protocol import (
    EvalRequest, Evaluation, Gradients, KeptRows, KeptScoring, LossSettings, Minibatch, PolicyState, RolloutScores,
    Samples, SamplingSettings, TrainResult,
)
from marl_ray.seeds import policy_seed
from marl_ray.algorithms import ppo


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ModelHost:
    """Holds the shared base, the reward adapters and one (LoRA, value head, optimizer) per policy.

    model, rewards, policies, generation: the run config's sections (`config.schema`)."""

    def __init__(self, model, rewards, policies, generation, seed: int = 0, torch_threads: int | None = None,
                 host_index: int = 0):
        tweaks.quiet_known_warnings()  # this process is the host's own (on Ray): its console is the driver's
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        import transformers  # noqa: F401  (imported before the baseline reading)
        from peft import LoraConfig

        from marl_ray.model import sampling
        from marl_ray.model.passes import MultiAdapterModel

        self.baseline_rss_mib = _rss_mib()  # after imports, before the model: what the run itself costs

        self.host_index = host_index
        self.group = None  # collective.Group: this host's member of the hosts' process group, once formed
        self.kept: dict[str, dict] = {}  # learner token -> {"kept": rollout id, worker: (prompts, policies, Samples)}
        self.tables: dict[str, Minibatch] = {}  # learner token -> its scored rows of the last step scored here
        self._rendezvous = None  # host 0: the store server of the group being formed
        # step -> {policy: PolicyState}: the states a failed step is rolled back to (the newest KEEP_SNAPSHOTS)
        self._snapshots: dict[int, dict] = {}
        # low_memory: this process owns its memory (see model/tweaks.py)
        self.model = MultiAdapterModel.from_pretrained(
            model.base, quantization=model.quantization, dtype=model.dtype, reference_adapter=model.reference_adapter,
            gradient_checkpointing=model.gradient_checkpointing, low_memory=True)
        for r in rewards:
            if r.path is not None:  # reward functions run in the learner, not here
                self.model.add_reward(r.name, r.path)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for p in policies:
            if p.init_from:
                self.model.load_policy(p.name, p.init_from, value_head=p.critic)
            else:
                # target_modules None: the architecture's default (model/targets.py), resolved by add_policy
                cfg = LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                 target_modules=None if p.lora.target_modules is None else list(p.lora.target_modules))
                # Same seed on every host: replicas start identical; seeded by the policy's name, so a
                # policy starts alike alone or beside others
                self.model.add_policy(p.name, cfg, seed=policy_seed(seed, p.name, "init"), value_head=p.critic)
            self.optimizers[p.name] = torch.optim.AdamW(
                self.model.policy_parameters(p.name), lr=p.lr, eps=1e-8, weight_decay=0.0)
        self.sampler = self.model.sampler  # rollouts on the training model; or a vLLM engine:
        if generation.backend == "vllm":
            self.sampler = sampling.VLLM(self._start_engine(model, policies, generation, seed))

    def _start_engine(self, model, policies, generation, seed: int):
        from marl_ray.model import vllm_engine

        if not vllm_engine.available():
            raise RuntimeError(
                "generation.backend is 'vllm' but vllm does not import in this environment: install the "
                "extra (GPU: pip install 'marl-ray[vllm]'; CPU: bash scripts/setup_vllm_cpu.sh) or set "
                "generation.backend: hf")
        cfg = self.model.base.config
        engine = vllm_engine.VLLMEngine(
            model.base, [p.name for p in policies], max_lora_rank=max(p.lora.r for p in policies),
            dtype=model.dtype, quantization=model.quantization,
            max_model_len=generation.vllm_max_model_len or cfg.max_position_embeddings,
            gpu_memory_utilization=generation.vllm_gpu_memory_utilization, kv_cache_gib=generation.vllm_kv_cache_gib,
            sleep=generation.vllm_sleep, seed=seed)
        engine.sleep()
        return engine

    @property
    def engine(self):
        """The vLLM engine, or None when rollouts run on the training model."""
        return getattr(self.sampler, "engine", None)

    # ------------------------------------------------------------ info
    def pid(self) -> int:
        """This process's id: cheap; a host Ray restarted has another (the learner checks it each step)."""
        return os.getpid()

    def info(self) -> dict:
        """A report of this host (JSON-serialisable: it goes into the run summary)."""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except ImportError:
            node = "local"
        return {
            "host_index": self.host_index, "pid": os.getpid(), "node_id": node,
            "fingerprint": self.model.fingerprint, "quantization": self.model.quantization,
            "policies": self.model.policies, "rewards": self.model.rewards,
            "base_params": sum(p.numel() for p in self.model.base.parameters()),
            "rss_mib": _rss_mib(), "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": self.baseline_rss_mib,
            "base_copies": self.base_copies(),
            "torch_threads": torch.get_num_threads(), "device": str(self.model.device),
            "sampler": self.sampler.name,
            "generation_backend": "vllm" if self.engine is not None else "hf",
            "vllm": self.engine.info() if self.engine is not None else None,
        }

    def base_copies(self) -> int:
        """How many tensors in this process hold the base's embedding matrix (1 = one base)."""
        emb = self.model.base.get_input_embeddings().weight
        ptrs = {t.untyped_storage().data_ptr() for t in _live_tensors()
                if t.shape == emb.shape and t.dtype == emb.dtype and t.device == emb.device and torch.equal(t, emb)}
        return len(ptrs)

    # ------------------------------------------------------------ sample
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], policies: list[str], settings: SamplingSettings, seed: int,
               keep: tuple[str, int, int] | None = None) -> Samples:
        """Responses of `prompts[i]` under `policies[i]`, exactly R = max_new_tokens positions each;
        positions after the first EOS (possible only with stop_at_eos and min_new_tokens < R) are
        padding (mask 0). With settings.scored, also the policy's logprobs, values and entropies of the
        sampled tokens where the sampler gives them (the lean decode loop). With settings.batch_rows,
        at most that many rows are decoded at once, chunk k under seed + k.

        keep = (learner token, rollout id, rollout worker): this host also keeps the rows, to score and
        train on them where they are (`score_kept`, `KeptRows`); a learner's parts of an older rollout are
        dropped."""
        out = self._sample(prompts, policies, settings, seed)
        if keep is not None:
            token, kept, worker = keep
            parts = self.kept.get(token)
            if parts is None or parts["kept"] != kept:
                parts = self.kept[token] = {"kept": kept}
            parts[worker] = (list(prompts), list(policies), out)
        return out

    def _sample(self, prompts, policies, settings: SamplingSettings, seed: int) -> Samples:
        order = _by_policy(policies)
        if order is not None:  # each policy's rows side by side: one LoRA product per policy and layer
            out = self._sample([prompts[i] for i in order], [policies[i] for i in order], settings, seed)
            back = _inverse(order)
            return Samples(out.responses[back], out.response_mask[back], None if out.scores is None else
                           RolloutScores(*(getattr(out.scores, f)[back] for f in RolloutScores.FIELDS)))
        k = settings.batch_rows
        if not k or len(prompts) <= k:
            return self.sampler.sample(self.model, prompts, policies, settings, seed)
        return Samples.cat([self.sampler.sample(self.model, prompts[lo:lo + k], policies[lo:lo + k], settings, seed + i)
                            for i, lo in enumerate(range(0, len(prompts), k))])

    # ------------------------------------------------------------ rows kept here
    @torch.no_grad()
    def score_kept(self, req: KeptScoring) -> Evaluation:
        """`evaluate` of the rows this host sampled and kept (req.workers' parts of rollout req.kept, in
        that order: prompts left-padded to their longest), which it then keeps with their scores as the
        learner's table for the step's updates. Only the scores go back; the rows stay here."""
        from marl_ray.model.sampling import pad_left

        parts = self.kept.get(req.token)
        missing = [w for w in req.workers if parts is None or parts["kept"] != req.kept or w not in parts]
        if missing:
            raise RowsLost(f"host {self.host_index} keeps no rows of rollout {req.kept} from rollout workers "
                           f"{missing} (was it restarted, or did a later rollout replace them?)")
        got = [parts[w] for w in req.workers]
        prompts = [p for g in got for p in g[0]]
        policies = [p for g in got for p in g[1]]
        samples = Samples.cat([g[2] for g in got])
        ids, mask = pad_left(prompts, 0)
        resp, rmask, roll = samples.responses, samples.response_mask, samples.scores if req.rollout else None
        input_ids, attention_mask, P = torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), ids.shape[1]
        ev = self.evaluate(EvalRequest(input_ids, attention_mask, policies, req.rewards, P, roll, req.reference,
                                       req.chunk))
        zeros = torch.zeros(rmask.shape)
        self.tables[req.token] = Minibatch(input_ids, attention_mask, P, rmask, ev.logprobs_BR, ev.values_BR, zeros,
                                           zeros, ev.ref_logprobs_BR)
        return ev

    def keep_advantages(self, token: str, advantages_BR: torch.Tensor, returns_BR: torch.Tensor,
                        mask_BR: torch.Tensor):
        """The step's advantages, returns and update masks of the rows this host keeps (in their order)."""
        t = self._table(token)
        if advantages_BR.shape != t.mask.shape:
            raise ValueError(f"advantages {tuple(advantages_BR.shape)} for {tuple(t.mask.shape)} kept rows")
        t.advantages, t.returns, t.mask = advantages_BR, returns_BR, mask_BR

    def kept_rows(self, token: str, idx: list[int]) -> Minibatch:
        """Rows idx of the rows this host keeps for learner `token`, as a Minibatch."""
        return self._table(token).take(idx)

    def lend_rows(self, token: str, idx: list[int]) -> list:
        """`kept_rows` for another host, put in the object store by this host: the list holds a
        reference owned here, so the rows go from this host to the one that reads them (not through
        the caller, which gets the reference alone)."""
        import ray

        return [ray.put(self.kept_rows(token, idx))]

    def _table(self, token: str) -> Minibatch:
        if token not in self.tables:
            raise RowsLost(f"host {self.host_index} keeps no scored rows for this learner (was it restarted?): "
                           "the step must be redone")
        return self.tables[token]

    def _rows(self, mb: "Minibatch | KeptRows | None") -> "Minibatch | None":
        """A minibatch shard as tensors: given, or assembled from kept rows and rows lent by other hosts."""
        if not isinstance(mb, KeptRows):
            return mb
        from marl_ray.runtime.handles import get

        pieces = [self.kept_rows(mb.token, mb.own)] if mb.own else []
        for b in (get(list(mb.borrowed)) if mb.borrowed else []):
            pieces.append(get(b[0]) if isinstance(b, list) else b)  # lend_rows' reference, or the rows
        return Minibatch.cat(pieces) if pieces else None

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, req: EvalRequest) -> Evaluation:
        """Policy logprobs + values, reference logprobs, reward scores of a batch, one pass.

        These logprobs (not a generation engine's) are the PPO `old_logprobs`: the same code
        computes the new ones during training, so the ratio is exactly 1 before any update. With
        req.rollout (ppo.rollout_logprobs) the policy's come from the decode steps instead.
        """
        n = len(req.policies)
        order = _by_policy(req.policies)
        if order is not None:  # each policy's rows side by side (as in sample)
            ev = self.evaluate(req.take(order))
            back = _inverse(order)
            return Evaluation(*(getattr(ev, f)[back] for f in Evaluation.FIELDS))
        if req.chunk and n > req.chunk:  # in chunks of rows: the pass's peak memory is a chunk's
            parts = [self.evaluate(replace(req.rows(slice(lo, lo + req.chunk)), chunk=None))
                     for lo in range(0, n, req.chunk)]
            return Evaluation(*(torch.cat([getattr(p, f) for p in parts]) for f in Evaluation.FIELDS))
        dev = self.model.device
        ev = self.model.evaluate(req.input_ids.to(dev), req.attention_mask.to(dev), req.policies, req.rewards,
                                 req.response_start, rollout=req.rollout, reference=req.reference)
        return Evaluation(*(t.cpu() for t in (ev.logprobs_BR, ev.ref_logprobs_BR, ev.values_BR, ev.scores_B,
                                                ev.entropy_BR)))

    # ------------------------------------------------------------ train
    def forward_backward(self, policy: str, mb: Minibatch | KeptRows, total_tokens: float,
                         loss: LossSettings) -> Gradients:
        """LoRA + value-head gradients of this shard's share of a minibatch's PPO loss.

        The loss is scaled by shard_tokens / total_tokens, so summing the hosts' gradients
        gives exactly the gradient of the whole minibatch's token-mean loss. With
        loss.micro_batch_size the shard runs in chunks of that many rows, each scaled the
        same way, and their gradients and stats are summed here.
        """
        g = self._shard_gradients(policy, mb, total_tokens, loss)
        return Gradients({k: v.cpu() for k, v in g.grads.items()}, g.stats)

    def _shard_gradients(self, policy: str, mb: "Minibatch | KeptRows | None", total_tokens: float,
                         loss: LossSettings) -> Gradients:
        """This host's shard's gradients and stats; zeros when it has no rows of the minibatch (it still
        takes part in the sums)."""
        keys = _stat_keys(loss)
        mb = self._rows(mb)
        if mb is None or not len(mb):
            return Gradients({k: torch.zeros_like(p) for k, p in self.model.policy_state(policy).items()},
                             {k: 0.0 for k in keys})
        g = self._gradients(policy, mb, total_tokens, loss)
        if set(g.stats) != set(keys):
            raise RuntimeError(f"statistics {sorted(g.stats)} are not the expected {keys}")
        return g

    def _gradients(self, policy: str, mb: Minibatch, total_tokens: float, loss: LossSettings) -> Gradients:
        """forward_backward's gradients (on the model's device) and stats."""
        n = len(mb)
        step = loss.micro_batch_size or n
        trainable = self.model.policy_state(policy)
        grads, stats = None, None
        for lo in range(0, n, step):
            g, s = self._forward_backward(policy, trainable, mb.chunk(lo, lo + step), total_tokens, loss)
            grads = g if grads is None else {k: grads[k].add_(g[k]) for k in grads}
            stats = s if stats is None else {k: stats[k] + s[k] for k in stats}
        return Gradients({k: g.detach() for k, g in grads.items()}, stats)

    def _forward_backward(self, policy: str, trainable: dict, mb: Minibatch, total_tokens: float,
                          loss_cfg: LossSettings):
        dev = self.model.device
        mask = mb.mask.to(dev).float()
        logprobs, values, logits = self.model.policy_forward(
            policy, mb.input_ids.to(dev), mb.attention_mask.to(dev), mb.response_start)
        if loss_cfg.algorithm != "ppo":
            return self._critic_free(trainable, mb, logprobs, logits, mask, total_tokens, loss_cfg)
        pg, pg_stats = ppo.policy_loss(logprobs, mb.old_logprobs.to(dev), mb.advantages.to(dev), mask,
                                       cliprange=loss_cfg.cliprange)
        vf, vf_stats = ppo.value_loss(values, mb.old_values.to(dev), mb.returns.to(dev), mask,
                                      cliprange_value=loss_cfg.cliprange_value)
        share = float(mask.sum()) / total_tokens
        loss = (pg + loss_cfg.vf_coef * vf) * share
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(trainable.items(), grads)}
        with torch.no_grad():
            entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), mask)
        pg, vf = pg.detach(), vf.detach()
        stats = {"loss/policy": float(pg) * share, "loss/value": float(vf) * share,
                 "policy/approxkl": float(pg_stats["approxkl"]) * share,
                 "policy/clipfrac": float(pg_stats["clipfrac"]) * share,
                 "val/clipfrac": float(vf_stats["vf_clipfrac"]) * share,
                 "policy/entropy": float(entropy) * share, "val/ratio": float(pg_stats["ratio_mean"]) * share}
        return grads, stats

    def _critic_free(self, trainable: dict, mb: Minibatch, logprobs, logits, mask, total_tokens: float,
                     loss_cfg: LossSettings):
        """The clipped surrogate of grpo / rloo / reinforce_pp (no value loss), aggregated by loss_type
        over the whole minibatch's normalisers: this shard's share of the minibatch loss."""
        from marl_ray.algorithms import grpo

        dev = self.model.device
        ref = mb.ref_logprobs.to(dev) if (loss_cfg.beta > 0 and mb.ref_logprobs is not None) else None
        per_token, st = grpo.per_token_loss(logprobs, mb.old_logprobs.to(dev), mb.advantages.to(dev), mask,
                                            loss_cfg.epsilon_low, loss_cfg.epsilon_high, ref_logprobs_BT=ref,
                                            beta=loss_cfg.beta)
        loss = grpo.aggregate(per_token, mask, loss_cfg.loss_type, n_seqs=loss_cfg.n_seqs, n_tokens=total_tokens,
                              max_len=loss_cfg.max_len)
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(trainable.items(), grads)}
        with torch.no_grad():
            entropy = (ppo.entropy_from_logits(logits) * mask).sum()
        # every statistic as this shard's share of the minibatch's token mean: the hosts' shares add up
        stats = {"loss/policy": float(loss.detach()), "policy/entropy": float(entropy) / total_tokens,
                 "policy/clipfrac": float(st["clip_region_sum"]) / total_tokens,
                 "policy/clipfrac_low": float(st["clip_low_sum"]) / total_tokens,
                 "policy/clipfrac_high": float(st["clip_high_sum"]) / total_tokens,
                 "val/ratio": float(st["ratio_sum"]) / total_tokens}
        if ref is not None:
            stats["policy/kl_k3"] = float(st["kl_sum"]) / total_tokens
        return grads, stats

    def train_minibatch(self, policy: str, mb: Minibatch | KeptRows, total_tokens: float, loss: LossSettings,
                        max_grad_norm: float | None) -> TrainResult:
        """forward_backward + optim_step in one call, for a group of this one host: the gradients
        never leave the host. Nothing is applied (weights and optimizer state untouched) when a
        gradient or a stat is not finite."""
        g = self._gradients(policy, self._rows(mb), total_tokens, loss)
        finite = all(bool(torch.isfinite(t).all()) for t in g.grads.values()) and all(
            math.isfinite(v) for v in g.stats.values())
        if finite:
            self.optim_step(policy, g.grads, max_grad_norm)
        return TrainResult(g.stats, finite)

    # ------------------------------------------------------------ collective (host to host)
    def open_rendezvous(self, world: int, timeout_s: float) -> tuple[str, int]:
        """Host 0, before a group forms: a TCPStore server on this node's address (the one Ray gives
        it) and a free port; returns (address, port) for every host's `join_group`."""
        from marl_ray.runtime import collective

        self._rendezvous = collective.Rendezvous(collective.node_address(), world, timeout_s)
        return self._rendezvous.address, self._rendezvous.port

    def join_group(self, rank: int, world: int, address: str, port: int, generation: int, backend: str,
                   timeout_s: float) -> int:
        """Become rank `rank` of generation `generation` of the hosts' process group (any older group of
        this host is dropped). Returns this process's id (the group holds for these processes only)."""
        from marl_ray.runtime import collective

        self.group = None
        rendezvous, self._rendezvous = (self._rendezvous, None) if rank == 0 else (None, None)
        if rank == 0 and rendezvous is None:
            raise RuntimeError("host 0 has no open rendezvous (was it restarted?): form the group again")
        self.group = collective.Group(rank, world, address, port, generation,
                                      collective.resolve_backend(backend, self.model.device), timeout_s,
                                      rendezvous=rendezvous, device=self.model.device)
        self.group.barrier()  # every member is connected before the first gradient
        return os.getpid()

    def leave_group(self):
        self.group = None

    def group_state(self) -> tuple[int, int]:
        """(this process's id, the generation of its group; 0: none)."""
        return os.getpid(), 0 if self.group is None else self.group.generation

    def train_collective(self, policy: str, mb: Minibatch | KeptRows | None, total_tokens: float, loss: LossSettings,
                         max_grad_norm: float | None, generation: int, comm_dtype: str = "fp32",
                         bucket_bytes: int = 25 << 20) -> TrainResult:
        """One minibatch update of `policy` summed among the hosts: this host's shard's gradients (zeros
        when it has no rows), an allreduce of the gradients (in buckets) and of the statistics, and the
        same optimizer step on every host. Only the statistics go back to the caller (the replicas are
        compared once a step, `fingerprints`).
        Nothing is applied anywhere when a summed gradient or statistic is not finite (every host sees
        the same sums, so every host decides alike)."""
        if self.group is None or self.group.generation != generation:
            raise RuntimeError(f"host {self.host_index} is not in the hosts' group generation {generation} "
                               f"(it has {None if self.group is None else self.group.generation}): form it again")
        keys = _stat_keys(loss)
        g = self._shard_gradients(policy, mb, total_tokens, loss)
        grads, stats = g.grads, g.stats
        names = list(grads)
        self.group.allreduce_([grads[k] for k in names], comm_dtype, bucket_bytes)
        stats = dict(zip(keys, self.group.allreduce_values([float(stats[k]) for k in keys])))
        finite = all(bool(torch.isfinite(t).all()) for t in grads.values()) and all(
            math.isfinite(v) for v in stats.values())
        if not finite:
            return TrainResult(stats, False)
        self.optim_step(policy, grads, max_grad_norm)
        return TrainResult(stats, True)

    def optim_step(self, policy: str, grads: dict, max_grad_norm: float | None):
        """Apply one optimizer step from (summed) gradients."""
        params = self.model.policy_state(policy)
        for k, p in params.items():
            p.grad = grads[k].to(p.device, p.dtype)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        opt = self.optimizers[policy]
        for group in opt.param_groups:
            # torch picks the per-tensor loop on CPU by default; the multi-tensor (foreach) kernels
            # compute the same update (bit for bit) with a fraction of the calls.
            if group.get("foreach") is None and not group.get("fused"):
                group["foreach"] = True
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def fingerprints(self, policies: list[str]) -> dict[str, str]:
        """A fingerprint of each policy's trainable tensors, reduced where they live (no copy leaves the
        device): per tensor, in name order, the sum of its raw bits read as integers and their sum weighted
        by position, in wrapping int64. Replicas that agree bit for bit give the same fingerprint; any
        changed bit changes it (save for a chance collision). The learner compares them once a step."""
        out = {}
        for policy in policies:
            acc = []
            for k, v in sorted(self.model.policy_state(policy).items()):
                t = v.detach().contiguous().reshape(-1)
                bits = t.view(_INT_OF_SIZE[t.element_size()]).long()
                pos = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64).mul_(0x9E3779B1)
                acc.append(torch.stack([bits.sum(), (bits * pos).sum()]))
            out[policy] = "".join(f"{x & (2**64 - 1):016x}" for x in torch.stack(acc).sum(0).tolist())
        return out

    def checksum(self, policy: str) -> str:
        """sha256 of every trainable tensor of `policy` (LoRA + value head), in name order."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.policy_state(policy).items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def role_checksum(self, name: str) -> str:
        """sha256 of adapter `name`'s LoRA tensors and its head (score head of a reward, value head of a
        policy), bit-exact, in name order: shows an adapter left untouched by training."""
        heads = {**self.model.score_heads, **self.model.value_heads}
        tensors = dict(self.model._lora_params(name))
        if name in heads:
            tensors.update({f"head.{k}": v for k, v in heads[name].named_parameters()})
        return _digest(tensors)

    def base_checksum(self) -> str:
        """sha256 of every base parameter and buffer (LoRA weights excluded), bit-exact, in name order."""
        tensors = {k: v for k, v in self.model.base.named_parameters() if "lora_" not in k}
        tensors.update({f"buffer.{k}": v for k, v in self.model.base.named_buffers() if "lora_" not in k})
        return _digest(tensors)

    # ------------------------------------------------------------ state
    def save_state(self, policy: str, folder: str, with_optimizer: bool = True) -> str:
        """Policy folder (plain peft + value head) and, beside it, optimizer.pt."""
        folder = Path(folder)
        self.model.save_policy(policy, folder)
        if with_optimizer:
            tmp = folder / "optimizer.pt.tmp"
            torch.save(self.optimizers[policy].state_dict(), tmp)
            os.replace(tmp, folder / "optimizer.pt")
        return str(folder)

    def export_policy(self, policy: str) -> dict[str, bytes]:
        """The files of `policy` (peft folder + value head + optimizer.pt) as bytes, for a
        checkpoint written by the learner, wherever it runs."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / policy
            self.save_state(policy, str(folder))
            return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    def write_policies(self, storage, rel: str, policies: list[str]) -> dict[str, dict[str, int]]:
        """Write each policy's files (`export_policy`'s) to `storage` (a `marl_ray.storage.Storage`) under
        rel/policies/NAME, or rel/NAME when rel is "policies" (the run's final export); the files go from
        this host to the storage. Returns each file's size."""
        out = {}
        for p in policies:
            files = self.export_policy(p)
            storage.write_files(f"{rel}/{p}" if rel == "policies" else f"{rel}/policies/{p}", files)
            out[p] = {name: len(data) for name, data in files.items()}
        return out

    def read_policies(self, storage, rel: str, policies: list[str]) -> dict[str, str]:
        """Load each policy's weights, value head and optimizer state from a checkpoint in `storage`
        (rel/policies/NAME), read by this host itself; returns their checksums."""
        return {p: self.import_policy(p, storage.read_files(f"{rel}/policies/{p}")) for p in policies}

    def import_policy(self, policy: str, files: dict[str, bytes]) -> str:
        """Load weights, value head and optimizer state of `policy` from `export_policy` files."""
        import io

        from safetensors.torch import load as load_safetensors

        lora = load_safetensors(files[ADAPTER_WEIGHTS])
        head = load_safetensors(files[VALUE_HEAD_FILE]) if VALUE_HEAD_FILE in files else {}
        params = self.model.policy_state(policy)
        with torch.no_grad():
            for k, p in params.items():
                if k.startswith("value_head."):
                    src, k_src = head, k[len("value_head."):]
                else:  # peft files name LoRA weights without the adapter name
                    src, k_src = lora, k.replace(f".{policy}.weight", ".weight")
                if k_src not in src:
                    raise ValueError(f"checkpoint of policy {policy!r} lacks {k_src}")
                p.copy_(src[k_src])
        if "optimizer.pt" in files:
            self.optimizers[policy].load_state_dict(
                torch.load(io.BytesIO(files["optimizer.pt"]), map_location="cpu", weights_only=False))
        return self.checksum(policy)

    def get_state(self, policy: str) -> PolicyState:
        """Weights + optimizer state of `policy` (copies: later steps do not change them), to restore
        this or another replica to this point. Weights in CPU memory (pinned on a CUDA host); the
        optimizer's state where the optimizer keeps it."""
        import copy

        pin = self.model.device.type == "cuda"
        weights = {}
        for k, v in self.model.policy_state(policy).items():
            c = v.detach().to("cpu", copy=True)
            weights[k] = c.pin_memory() if pin else c
        return PolicyState(weights, copy.deepcopy(self.optimizers[policy].state_dict()))

    def set_state(self, policy: str, state: PolicyState) -> str:
        self._set_state(policy, state)
        return self.checksum(policy)

    def _set_state(self, policy: str, state: PolicyState):
        params = self.model.policy_state(policy)
        with torch.no_grad():
            for k, v in state.weights.items():
                params[k].copy_(v)
        self.optimizers[policy].load_state_dict(state.optimizer)

    # ------------------------------------------------------------ snapshots (kept here, never sent to the driver)
    def snapshot(self, tag: int):
        """Keep the state of every policy as it is now (weights and optimizer), under `tag` (the step it
        starts): what a failed step is rolled back to. It stays on this host. The one before is kept too
        (KEEP_SNAPSHOTS): until the learner has checked that no actor restarted during the step, that is
        the one a recovery needs."""
        self._keep(tag, {p: self.get_state(p) for p in self.optimizers})

    def _keep(self, tag: int, states: dict):
        self._snapshots[tag] = states
        for old in sorted(self._snapshots)[:-KEEP_SNAPSHOTS]:
            del self._snapshots[old]

    def restore(self, tag: int):
        """Put every policy back to this host's snapshot `tag`. SnapshotMissing when it has none of that tag
        (it was restarted since): it is then refilled from a peer (`share_snapshot`, `restore_from`)."""
        self._restore(self._held(tag))

    def share_snapshot(self, tag: int, by_reference: bool = True) -> list:
        """Snapshot `tag` for a peer that lost it. by_reference (Ray): a list holding a reference put by
        this host, so the state goes host to host (the caller passes the list on, never the state);
        otherwise (in-process) the snapshot itself."""
        held = (tag, self._held(tag))
        if not by_reference:
            return [held]
        import ray

        return [ray.put(held)]

    def restore_from(self, shared: list, tag: int):
        """Take a peer's snapshot (`share_snapshot`'s result) as this host's own and restore it."""
        import copy

        from marl_ray.runtime.handles import get

        held = shared[0] if isinstance(shared[0], tuple) else get(shared[0])
        if held[0] != tag:
            raise SnapshotMissing(f"a peer shared the snapshot of step {held[0]}, not {tag}")
        self._keep(tag, copy.deepcopy(held[1]))
        self._restore(self._snapshots[tag])

    def snapshot_tags(self) -> list[int]:
        """The steps whose start this host holds, oldest first."""
        return sorted(self._snapshots)

    def _held(self, tag: int) -> dict:
        if tag not in self._snapshots:
            raise SnapshotMissing(f"host {self.host_index} holds no snapshot of step {tag} "
                                  f"(it holds {self.snapshot_tags()}: was it restarted?)")
        return self._snapshots[tag]

    def _restore(self, states: dict):
        for p, st in states.items():
            self._set_state(p, st)

    def rng_state(self) -> dict:
        return {"torch": torch.random.get_rng_state(), "python": random.getstate()}

    def set_rng_state(self, state: dict):
        torch.random.set_rng_state(state["torch"])
        random.setstate(state["python"])


_PPO_STATS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac", "policy/entropy",
              "val/ratio")
_CRITIC_FREE_STATS = ("loss/policy", "policy/entropy", "policy/clipfrac", "policy/clipfrac_low", "policy/clipfrac_high",
                      "val/ratio")


class SnapshotMissing(RuntimeError):
    """A host was asked for a snapshot it does not hold (it was restarted since it was taken)."""


class RowsLost(RuntimeError):
    """A host was asked for rows it does not keep (it was restarted since it sampled them)."""


#: Snapshots a host keeps: the step's start, and the one before until the step is known to be good.
KEEP_SNAPSHOTS = 2

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _by_policy(policies: list[str]) -> list[int] | None:
    """A stable order of the rows that puts each policy's rows side by side (first-seen policy first);
    None when they already are (a mixed-adapter pass then computes one LoRA product per policy and layer,
    not one per run of rows)."""
    first = {p: i for i, p in reversed(list(enumerate(policies)))}
    order = sorted(range(len(policies)), key=lambda i: first[policies[i]])
    return None if order == list(range(len(policies))) else order


def _inverse(order: list[int]) -> torch.Tensor:
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return back


def _stat_keys(loss: LossSettings) -> list[str]:
    """The statistics a shard's update reports (what `_forward_backward` / `_critic_free` return), sorted:
    the same layout on every host, also on one without rows."""
    if loss.algorithm == "ppo":
        return sorted(_PPO_STATS)
    # the learner sends reference logprobs exactly when beta > 0 (Learner.minibatch)
    return sorted(_CRITIC_FREE_STATS + (("policy/kl_k3",) if loss.beta > 0 else ()))


def _digest(tensors: dict) -> str:
    """sha256 of the raw bytes of named tensors (any dtype, quantized storage included), in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]


def _live_tensors():
    import warnings

    frozen = gc.get_freeze_count()  # vLLM gc.freeze()s its start-up objects: list those too
    if frozen:
        gc.unfreeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on some torch module objects warns
            objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    finally:
        if frozen:
            gc.freeze()
    return objs
