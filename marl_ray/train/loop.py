"""The learner: the single controller of an RL run (the driver of a `ray job submit` job).

One step reads like the algorithm:

    batch = rollout()              workers stream prompts to hosts; the hosts sample
    ev    = evaluate(batch)        one mixed-adapter pass: logprobs, values, reference, rewards
    adv   = advantages(batch, ev)  rewards - KL penalty -> GAE -> whitened advantages
    train(batch, ev, adv)          PPO epochs; each minibatch split over the host group,
                                   gradients summed, the same step on every host

The math lives in `algorithms.ppo`; the hosts behind `runtime.host_group.HostGroup`; what happens
when an actor or a node is lost, in `train.resilience`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

import torch

from marl_ray import console
from marl_ray.algorithms import advantages as adv_math
from marl_ray.algorithms import ppo
from marl_ray.algorithms.advantages import PolicyAdvantages
from marl_ray.episodes.runner import EpisodeBatch, EpisodeRunner
from marl_ray.model.sampling import Samples, SamplingSettings, pad_left
from marl_ray.runtime.handles import LocalHandle, get
from marl_ray.runtime.host_group import GradSync, HostGroup, ReplicaDivergence, split
from marl_ray.runtime.protocol import EvalRequest, Evaluation, KeptScoring, LossSettings
from marl_ray.seeds import policy_seed
from marl_ray.storage import Storage
from marl_ray.train import evaluation, resilience, saving
from marl_ray.train.batch import Batch
from marl_ray.train import rewards as reward_fns
from marl_ray.train.resilience import ActorRestarted, HostLost
from marl_ray.train.rewards import RewardFunctionError

log = logging.getLogger(__name__)

__all__ = ["Batch", "PolicyAdvantages", "Learner", "NonFiniteError", "ReplicaDivergence", "ActorRestarted",
           "HostLost", "RewardFunctionError", "rollout_scored"]


def rollout_scored(cfg) -> bool:
    """ppo.rollout_logprobs resolved: null = on for a full-precision base (fp32 or bf16), off for a
    4/8-bit one (its decode and its passes were not compared)."""
    if cfg.ppo.rollout_logprobs is not None:
        return bool(cfg.ppo.rollout_logprobs)
    return cfg.model.quantization == "none"


class NonFiniteError(RuntimeError):
    """A policy's updates were skipped for NaN/inf too many steps in a row."""


class Learner:
    def __init__(self, cfg, hosts, workers, worker_host, logger=None, gold_fn=None, host_nodes=None,
                 respawn_worker=None):
        """hosts: a HostGroup (or a list of host handles); workers[w] streams to hosts[worker_host[w]].
        host_nodes[i]: the node of host i (Ray), to tell a lost node from a restarting host;
        respawn_worker(w, node_id): a new rollout worker w on that node (when its node is gone)."""
        self.cfg = cfg
        self.local = bool(hosts) and isinstance(hosts[0], LocalHandle)  # in-process runtime
        self.hosts = hosts if isinstance(hosts, HostGroup) else HostGroup(hosts, self.local)
        self.workers = list(workers)
        self.worker_host = list(worker_host)
        self.host_nodes = list(host_nodes) if host_nodes else None
        self.respawn_worker = respawn_worker
        self.logger = logger
        # Optional gold oracle (texts -> scores): a metric only, never part of the reward.
        self.gold_fn = gold_fn
        self.policies = [p.name for p in cfg.policies]
        self.spec = {p.name: p for p in cfg.policies}
        self.kl_ctl = {
            p.name: (ppo.AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                     else ppo.FixedKLController(p.init_kl_coef))
            for p in cfg.policies}
        self.step = 0
        self.token = uuid.uuid4().hex[:12]  # names this learner's rows on the hosts
        self.rollouts = 0  # rollouts so far: each batch's rows are kept on the hosts under a new id
        self.bad_steps = {p: 0 for p in self.policies}  # consecutive steps with a skipped update
        self.skip_count = {p: 0 for p in self.policies}  # steps with a skipped update, in all
        # snapshots, recovery of lost actors and nodes around the steps (Ray; none in-process)
        self.resilience = resilience.Resilience(self)
        self.last_checkpoint = None  # the checkpoint this run last wrote or resumed from (resilience.rewind)
        self.storage = Storage(cfg.run.storage) if cfg.run.storage else None  # checkpoints written by the hosts
        self.ledger: list[dict] = []  # prompt ids consumed per step
        self.history: list[dict] = []
        # with rollout_scored, hosts return the decode steps' logprobs and values
        self.sampling = SamplingSettings.from_config(cfg.generation, scored=rollout_scored(cfg))
        g = cfg.ppo
        self.loss = {p.name: LossSettings(
            g.cliprange, g.cliprange_value, g.vf_coef, g.micro_batch_size, algorithm=p.algorithm, loss_type=p.loss_type,
            epsilon_low=p.epsilon_low, epsilon_high=p.epsilon_low if p.epsilon_high is None else p.epsilon_high,
            beta=p.beta, max_len=cfg.generation.max_new_tokens) for p in cfg.policies}
        # a policy named G times answers each prompt G times (a group, for grpo and rloo)
        self.rollout_policies = [p.name for p in cfg.policies for _ in range(p.num_generations)]
        kinds = {r.name: r for r in cfg.rewards}
        self.adapter = {p.name: next((r for r in p.reward if kinds[r].path is not None), None) for p in cfg.policies}
        self.reward_fns = {r.name: reward_fns.RewardFunction.from_spec(r.name, r.function, f"rewards[{i}].function")
                           for i, r in enumerate(cfg.rewards) if r.function is not None}
        # multi-turn episodes (cfg.episodes): the rollout phase plays them (episodes/runner.py)
        self.episodes = EpisodeRunner(self) if cfg.episodes is not None else None

    # ------------------------------------------------------------ phases
    def rollout(self) -> Batch:
        """Each worker takes its share of batch_size prompts; every prompt is answered by every policy."""
        if self.episodes is not None:
            return self.episodes.rollout()
        shares = [len(r) for r in split(self.cfg.ppo.batch_size, len(self.workers))]
        seed = (self.cfg.run.seed * 1_000_003 + self.step) * 1009
        self.rollouts += 1
        keep = (self.token, self.rollouts)  # the hosts keep the rows they sample, to score and train on them
        parts = get([self.workers[w].rollout.remote(self.hosts[self.worker_host[w]], k, self.rollout_policies,
                                                    self.sampling, seed + w * 7919, keep)
                     for w, k in enumerate(shares)])  # in worker order: deterministic for a seed
        samples = [get(ref) for part in parts for ref in part.samples]  # from the hosts, not via the workers
        if self.hosts.traffic is not None:
            self.hosts.traffic.add("samples", samples, "received")
        prompt_ids, prompt_mask = pad_left([p for part in parts for p in part.prompts], 0)
        P = prompt_ids.shape[1]
        got = Samples.cat(samples)
        # rollout: the decode steps' logprobs/values (then no policy pass), when every part has them
        resp, rmask, rollout = got.responses, got.response_mask, got.scores
        policies = [p for part in parts for p in part.policies]
        groups: dict[tuple, int] = {}  # (worker, prompt position in its share, policy) -> group id
        group_ids = []
        for part in parts:
            for i, pol in enumerate(part.policies):
                group_ids.append(groups.setdefault((part.worker, i // len(self.rollout_policies), pol), len(groups)))
        kept_workers: dict[int, list[int]] = {}  # host -> the workers whose parts it keeps, in worker order
        holder, hold_index, held = [], [], {}
        for part in parts:
            h = self.worker_host[part.worker]
            kept_workers.setdefault(h, []).append(part.worker)
            holder += [h] * len(part.policies)
            hold_index += range(held.get(h, 0), held.get(h, 0) + len(part.policies))
            held[h] = held.get(h, 0) + len(part.policies)
        return Batch(
            input_ids=torch.cat([prompt_ids, resp], 1), attention_mask=torch.cat([prompt_mask, rmask], 1),
            response_mask=rmask, response_start=P, policies=policies,
            prompt_ids=[i for part in parts for i in part.prompt_ids], rollout=rollout, group_ids=group_ids,
            texts=[t for part in parts for t in part.texts], columns=[c for part in parts for c in part.columns],
            messages=[m for part in parts for m in part.messages],
            kept=keep, holder=holder, hold_index=hold_index,
            kept_workers=kept_workers)

    def evaluate(self, batch: Batch) -> Evaluation:
        """Policy logprobs + values, reference logprobs and reward-adapter scores of every row, the rows
        split over the hosts. A pass has no policy rows when the rollout brought the decode steps'
        scores, no reference row for a policy that does not read them (grpo/rloo with beta 0), no
        reward row for a policy scored by functions alone."""
        rewards = [self.adapter[p] for p in batch.policies]
        reference = [self.spec[p].uses_reference for p in batch.policies]
        if batch.kept is not None:  # each host scores the rows it sampled and keeps them, scores included
            held = {h: [i for i in range(len(batch.policies)) if batch.holder[i] == h] for h in batch.kept_workers}
            return self.hosts.score_kept({h: KeptScoring(
                *batch.kept, batch.kept_workers[h], [rewards[i] for i in rows],
                None if all(reference) else [reference[i] for i in rows], batch.rollout is not None,
                self.cfg.ppo.micro_batch_size) for h, rows in held.items()}, held, len(batch.policies))
        return self.hosts.evaluate(EvalRequest(batch.input_ids, batch.attention_mask, batch.policies, rewards,
                                               batch.response_start, batch.rollout,
                                               None if all(reference) else reference,
                                               self.cfg.ppo.micro_batch_size))

    def decoded(self, batch: Batch) -> tuple[list[str], list[str]]:
        """Every row's prompt (its text, or its tokens decoded where it was given as token ids) and
        completion as text: decoded in one call the first time a step asks (rewards, gold metrics and
        sample logs share it)."""
        if batch.decoded is None:
            P, n = batch.response_start, len(batch.policies)
            untexted = [i for i in range(n) if not batch.texts or batch.texts[i] is None]
            texts = get(self.workers[0].decode.remote(
                [batch.input_ids[i, P:][batch.response_mask[i].bool()].tolist() for i in range(n)]
                + [batch.input_ids[i, :P][batch.attention_mask[i, :P].bool()].tolist() for i in untexted]))
            prompts = list(batch.texts) if batch.texts else [None] * n
            for i, t in zip(untexted, texts[n:]):
                prompts[i] = t
            batch.decoded = (prompts, texts[:n])
        return batch.decoded

    def rewards(self, batch: Batch, ev: Evaluation) -> tuple[torch.Tensor, dict[str, dict]]:
        """Each row's total reward (before reward_weight) and, per policy, each reward's mean and std.

        A reward adapter's score comes from `ev`; a reward function is called here as TRL's GRPOTrainer
        calls it (train/rewards.py): text rows' prompts and completions as strs, conversational rows' as
        message lists, each completion's token ids, a RewardState, the prompt rows' other fields as columns."""
        if isinstance(batch, EpisodeBatch):  # each row's reward is its role's, from the environment
            return batch.rewards_B, {p: batch.stats.get(p, {}) for p in self.policies}
        if not self.reward_fns:  # reward adapters alone: one adapter per policy
            return ev.scores_B, {p: {} for p in self.policies}

        texts, decoded = self.decoded(batch)
        messages = batch.messages or [None] * len(batch.policies)
        prompts = [t if m is None else [dict(x) for x in m] for t, m in zip(texts, messages)]  # the data's own: copies
        completions = [c if m is None else [{"role": "assistant", "content": c}] for c, m in zip(decoded, messages)]
        P = batch.response_start
        total = torch.zeros(len(batch.policies))
        stats = {}
        for p in self.policies:
            rows = batch.rows(p)
            values = {}
            spec = self.spec[p]
            state = reward_fns.RewardState(self.step, self.cfg.ppo.steps, p, spec.algorithm, spec.num_generations)
            ids = None
            for name in spec.reward:
                if name in self.reward_fns:
                    fn = self.reward_fns[name]
                    if ids is None and fn.wants("completion_ids"):
                        ids = [batch.input_ids[i, P:][batch.response_mask[i].bool()].tolist() for i in rows]
                    keys = sorted({k for i in rows for k in batch.columns[i]})
                    cols = {k: [batch.columns[i].get(k) for i in rows] for k in keys}
                    got = fn([prompts[i] for i in rows], [completions[i] for i in rows], cols, step=self.step,
                             completion_ids=ids, trainer_state=state)
                    values[name] = torch.tensor(got, dtype=torch.float32)
                else:
                    values[name] = ev.scores_B[rows].float()
            weights = dict(zip(spec.reward, spec.reward_weights or (1.0,) * len(spec.reward)))
            total[rows], stats[p] = reward_fns.combine(values, weights)
        return total, stats

    def advantages(self, batch: Batch, ev: Evaluation) -> dict[str, PolicyAdvantages]:
        """Per policy: its total reward, then the advantages of its algorithm (algorithms/advantages.py)."""
        totals, reward_stats = self.rewards(batch, ev)
        out = {}
        g = self.cfg.ppo
        for p in self.policies:
            rows = batch.rows(p)
            spec = self.spec[p]
            a = adv_math.compute(spec, totals[rows] * spec.reward_weight, totals[rows], ev.logprobs_BR[rows],
                                 ev.ref_logprobs_BR[rows], ev.values_BR[rows], batch.response_mask[rows],
                                 self.kl_ctl[p].value, [batch.group_ids[i] for i in rows] if batch.group_ids else [],
                                 g.gamma, g.lam, g.whiten_advantages, g.kl_penalty)
            a.rows = rows
            a.extra = {**(a.extra or {}), **reward_stats[p]}
            out[p] = a
        return out

    def train(self, batch: Batch, ev: Evaluation, adv: dict[str, PolicyAdvantages]) -> dict[str, dict]:
        """ppo_epochs passes; each minibatch's rows (mini_batch_size prompts x num_generations) are split
        over the hosts (each takes the rows it keeps first), gradients summed host to host, one step everywhere."""
        self.hosts.configure(GradSync.from_cluster(self.cfg.cluster))
        self.hosts.ensure_group()  # formed when fit starts and again after a recovery; a restarted host shows here
        g = self.cfg.ppo
        # each policy's minibatch order from a stream of its own (named by the policy, not its place):
        # the policy deals its rows alike whether it trains alone or beside other policies
        gens = {p: torch.Generator().manual_seed(policy_seed(self.cfg.run.seed, p, "order", self.step))
                for p in self.policies}
        stats = {p: [] for p in self.policies}
        skipped = {p: 0 for p in self.policies}
        for p in self.policies:
            if not adv[p].finite:
                skipped[p] += 1
                log.warning("step %d, policy %r: non-finite reward/advantage; its update is skipped", self.step, p)
        # the hosts keep the rows: send each its rows' advantages, once
        self.hosts.keep_advantages(batch.kept[0], adv, batch.holder, batch.hold_index, batch.response_mask.shape)
        for _ in range(g.ppo_epochs):
            perms = {p: self._order(batch, adv[p].rows, gens[p]) for p in self.policies}
            for start in range(0, g.batch_size, g.mini_batch_size):
                pending = {}  # every policy's update is in flight before any is awaited
                for p in self.policies:
                    if skipped[p]:
                        continue
                    G = len(adv[p].rows) // g.batch_size  # rows per prompt: num_generations (x roles played)
                    local = perms[p][start * G:(start + g.mini_batch_size) * G]
                    mask = adv[p].mask[local]
                    if not bool(mask.any()):  # every row left out (dynamic sampling): nothing to learn from
                        continue
                    total = float(mask.sum().clamp(min=1))
                    loss = replace(self.loss[p], n_seqs=int((mask.sum(1) > 0).sum()))
                    # rows by reference: each host takes the ones it keeps first
                    shards = self.hosts.assign(batch.kept[0], [adv[p].rows[i] for i in local], batch.holder,
                                               batch.hold_index)
                    pending[p] = self.hosts.submit(p, shards, total, loss, g.max_grad_norm)
                for p, handle in pending.items():
                    result = self.hosts.finish(p, handle, g.max_grad_norm, f"step {self.step}")
                    if result.applied:
                        stats[p].append(result.stats)
                        continue
                    # Never let NaN/inf reach the adapters or the optimizer state: drop this
                    # policy's remaining updates of the step.
                    skipped[p] += 1
                    log.warning("step %d, policy %r: non-finite loss or gradient; update skipped", self.step, p)
        self.hosts.verify(self.policies, f"step {self.step}")  # the replicas agree: caught in the step they part
        out = {p: ({f"{k}_avg": sum(s[k] for s in v) / len(v) for k in v[0]} if v else {}) for p, v in stats.items()}
        lrs = get(self.hosts[0].lrs.remote(self.policies))  # the learning rate of each one's latest update
        for p in self.policies:
            self.bad_steps[p] = self.bad_steps[p] + 1 if skipped[p] else 0
            self.skip_count[p] += 1 if skipped[p] else 0
            out[p]["skipped/nonfinite"] = self.skip_count[p]
            out[p]["lr"] = lrs[p]
        return out

    @staticmethod
    def _order(batch: Batch, rows: list[int], gen: torch.Generator) -> list[int]:
        """An epoch's random order of a policy's rows (positions into `rows`). With rows sampled on several
        hosts, each host's rows are shuffled on their own and then dealt in turn (host 0's first, host 1's
        first, ..., host 0's second, ...): a minibatch holds each host's rows in proportion, so each host
        trains on rows it keeps and nothing is lent while the hosts keep as many rows each."""
        by_host: dict[int, list[int]] = {}
        for j, i in enumerate(rows):
            by_host.setdefault(batch.holder[i] if batch.holder else 0, []).append(j)
        dealt = [[own[k] for k in torch.randperm(len(own), generator=gen).tolist()]
                 for _, own in sorted(by_host.items())]
        return [d[k] for k in range(max(map(len, dealt), default=0)) for d in dealt if k < len(d)]

    # ------------------------------------------------------------ one step
    def run_step(self) -> dict[str, dict]:
        t0 = time.perf_counter()
        batch = self.rollout()
        t1 = time.perf_counter()
        ev = self.evaluate(batch)
        adv = self.advantages(batch, ev)
        t2 = time.perf_counter()
        train_stats = self.train(batch, ev, adv)
        t3 = time.perf_counter()
        n_samples = len(batch.policies)
        gen_tokens = int(batch.response_mask.sum())
        metrics = {}
        for p in self.policies:
            a = adv[p]
            kl_seq = (a.kl * a.mask).sum(1)
            ent_seq = (ev.entropy_BR[a.rows] * a.mask).sum(1)
            m = {
                "objective/kl": float(kl_seq.mean()),
                "objective/entropy": float(ent_seq.mean()),
                "objective/scores": float(a.raw_scores.mean()),
                "objective/rlhf_reward": float(a.scores.mean() - a.kl_coef * kl_seq.mean()),
                "objective/kl_coef": float(a.kl_coef),
            }
            if self.spec[p].critic:
                m.update({"val/mean": float(ppo.masked_mean(ev.values_BR[a.rows], a.mask)),
                          "returns/mean": float(ppo.masked_mean(a.returns, a.mask))})
            m.update(a.extra or {})
            m.update(train_stats[p])
            if a.finite:
                self.kl_ctl[p].update(float(kl_seq.mean()), self.cfg.ppo.batch_size)
            m.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
                      "time/step_s": t3 - t0, "perf/samples_per_s": n_samples / (t3 - t0),
                      "perf/gen_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9)})
            metrics[p] = m
        if self.gold_fn is not None:
            evaluation.gold_metrics(self, batch, metrics)
        if self.logger is not None and self.cfg.run.log_samples:
            evaluation.log_samples(self, batch, adv)
        self.ledger.append({"step": self.step, "prompt_ids": sorted(set(batch.prompt_ids))})
        self.step += 1
        return metrics

    def generate_texts(self, texts: list[str], policy: str, seed: int = 0) -> list[str]:
        """Completions of `texts` under `policy` ("ref" = the reference), decoded (train/evaluation.py)."""
        return evaluation.generate_texts(self, texts, policy, seed)

    def heldout(self, prompts: list, columns: list[dict], seed: int = 0) -> dict[str, dict]:
        """Each policy on held-out prompts, scored by its own rewards (train/evaluation.py)."""
        return evaluation.heldout(self, prompts, columns, seed)

    @property
    def recoveries(self) -> int:
        """Steps (or checkpoint saves) redone after an actor was lost."""
        return self.resilience.recoveries

    def regroup(self, keep: list[int]) -> list[int]:
        """Go on with hosts `keep` (indices of the current ones; the others' nodes are gone): the group
        shrinks, and each rollout worker of a dropped host is made anew on a node left (respawn_worker).
        Returns the workers made anew."""
        self.hosts = HostGroup([self.hosts[i] for i in keep], self.local, self.hosts.sync)
        self.host_nodes = [self.host_nodes[i] for i in keep]
        moved = []
        for w, h in enumerate(self.worker_host):
            if h in keep:
                self.worker_host[w] = keep.index(h)
            else:
                self.worker_host[w] = w % len(keep)
                self.workers[w] = self.respawn_worker(w, self.host_nodes[self.worker_host[w]])
                moved.append(w)
        return moved

    def checksums(self) -> dict[str, list[str]]:
        return {p: self.hosts.checksums(p) for p in self.policies}

    # ------------------------------------------------------------ state
    def state(self, host_rng: bool = True) -> dict:
        """Everything of the run outside the policies' weights and optimizers (for checkpoints).
        host_rng=False: without the hosts' RNG states (a step's snapshot: the hosts keep theirs)."""
        state = {
            "step": self.step, "kl_ctl": {p: c.state_dict() for p, c in self.kl_ctl.items()},
            "workers": get([w.state.remote() for w in self.workers]),
            "ledger": list(self.ledger), "history": list(self.history),
            "bad_steps": dict(self.bad_steps), "skip_count": dict(self.skip_count),
        }
        if host_rng:
            state["host_rng"] = self.hosts.all("rng_state")
        return state

    def set_state(self, state: dict):
        self.step = state["step"]
        for p, c in self.kl_ctl.items():
            c.load_state_dict(state["kl_ctl"][p])
        get([w.set_state.remote(s) for w, s in zip(self.workers, state["workers"])])
        if "host_rng" in state:  # one entry per host of the run that saved it; a group that shrank takes the first
            get([h.set_rng_state.remote(r) for h, r in zip(self.hosts.hosts, state["host_rng"])])
        self.ledger, self.history = list(state["ledger"]), list(state["history"])
        self.bad_steps, self.skip_count = dict(state["bad_steps"]), dict(state["skip_count"])

    def save_checkpoint(self, state: dict | None = None):
        """Write checkpoint step-N (train/saving.py); `state`: the learner state to write (default: read
        now). Returns its folder (a storage path with run.storage)."""
        return saving.save(self, state)

    def load_checkpoint(self, which: str):
        """Restore every host, worker and the learner from a checkpoint ('latest' or a folder)."""
        return saving.load(self, which)

    def export_policies(self) -> dict[str, str]:
        """The trained policies as plain peft folders (train/saving.py). Returns where."""
        return saving.export(self)

    # ------------------------------------------------------------ fit
    def fit(self, steps: int | None = None, on_step=None, max_step_retries: int = 3):
        """Run steps until cfg.ppo.steps (or `steps` more); `on_step(step, metrics)` after each.

        On Ray each step runs under `self.resilience`: a step that loses an actor is rolled back to its
        start on every host and worker and redone with the same seeds."""
        from tqdm import tqdm

        end = self.cfg.ppo.steps if steps is None else self.step + steps
        for p, s in self.checksums().items():
            if len(set(s)) != 1:
                raise ReplicaDivergence(f"policy {p!r}: hosts start from different weights: {s}")
        self.hosts.configure(GradSync.from_cluster(self.cfg.cluster))
        self.hosts.ensure_group()  # the hosts' group forms as the run starts (train() re-forms it after a recovery)
        bar = tqdm(total=end, initial=self.step, desc="ppo", unit="step", disable=not console.progress(self.cfg.run.progress))
        save_every = self.cfg.run.save_every
        res = None if self.local else self.resilience
        if res:
            res.max_retries = max_step_retries
        save = res.save if res else (lambda fn: fn())
        try:
            if res:
                res.snapshot()
            while self.step < end:
                before = self.state() if res is None and self.reward_fns else None
                try:
                    metrics = res.run_step(self.run_step) if res else self.run_step()
                except RewardFunctionError as e:
                    # the step failed before any update: back to its start, which is the last good state
                    if res:
                        res.recover()
                    else:
                        self.set_state(before)
                    path = saving.describe(self, self.save_checkpoint())
                    raise RewardFunctionError(f"{e}; the run stopped, its last good state (step {self.step}) is "
                                              f"saved to {path}") from e
                self.history.append({"step": self.step - 1, "metrics": metrics})
                if self.logger is not None:
                    self.logger.log(self.step - 1, metrics)
                if on_step is not None:
                    on_step(self.step - 1, metrics)
                bad = [p for p, n in self.bad_steps.items() if n >= self.cfg.ppo.max_nonfinite_steps]
                if bad:
                    path = saving.describe(self, save(self.save_checkpoint))
                    raise NonFiniteError(
                        f"policies {bad}: updates skipped for non-finite numbers {self.cfg.ppo.max_nonfinite_steps} "
                        f"steps in a row; last good state saved to {path}. Lower the learning rate or check "
                        "the reward adapter.")
                if save_every and self.step % save_every == 0 and self.step < end:
                    save(self.save_checkpoint)
                first = metrics[self.policies[0]]
                bar.set_postfix(samples_s=f"{first['perf/samples_per_s']:.1f}",
                                **{p: f"{m['objective/scores']:+.2f}" for p, m in metrics.items()})
                bar.update(1)
        finally:
            bar.close()
        return self.history
