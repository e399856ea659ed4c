"""The learner: the single controller of a PPO run (the driver of a `ray job submit` job).

Each step reads like the algorithm: rollout -> evaluate -> rewards with a KL penalty -> GAE
-> PPO epochs whose minibatches are split across the hosts -> the hosts' LoRA gradients are
summed -> every host applies the same optimizer step -> replica checksums must agree.
The math lives in `marl_ray.ppo`; this module only orchestrates actors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch

from marl_ray import ppo
from marl_ray.actors.handles import LocalHandle, get, put

log = logging.getLogger(__name__)


class ReplicaDivergence(RuntimeError):
    """Hosts hold different weights for a policy after the same step."""


class ActorRestarted(RuntimeError):
    """An actor was restarted by Ray since the last snapshot: its in-memory state is gone.

    Ray restarts an actor that dies between calls without raising anything to the caller;
    only its new process id gives it away."""


@dataclass
class Batch:
    """One step's trajectories: N rows of [left-padded prompt | response] (T = P + R)."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, R)
    response_start: int  # P
    policies: list[str]
    prompt_ids: list[int]
    extra: dict = field(default_factory=dict)

    def rows(self, policy: str) -> list[int]:
        return [i for i, p in enumerate(self.policies) if p == policy]


def _split(n: int, parts: int) -> list[range]:
    """Contiguous near-equal shards of range(n); empty ones are dropped."""
    out, start = [], 0
    for k in range(parts):
        size = n // parts + (1 if k < n % parts else 0)
        if size:
            out.append(range(start, start + size))
        start += size
    return out


_SCORED = ("logprobs_BR", "values_BR", "entropy_BR")  # what a host's sample returns with gen["scored"]


def rollout_scored(cfg) -> bool:
    """ppo.rollout_logprobs resolved: null = on for a full-precision base (fp32 or bf16), off for a
    4/8-bit one (its decode and its passes were not compared)."""
    if cfg.ppo.rollout_logprobs is not None:
        return bool(cfg.ppo.rollout_logprobs)
    return cfg.model.quantization == "none"


class Learner:
    def __init__(self, cfg, hosts, workers, worker_host, logger=None, gold_fn=None):
        self.cfg = cfg
        self.hosts = hosts
        self.workers = workers
        self.worker_host = worker_host
        self.logger = logger
        self.local = bool(hosts) and isinstance(hosts[0], LocalHandle)  # in-process runtime
        # Optional gold oracle (texts -> scores): a metric only, never part of the reward.
        self.gold_fn = gold_fn
        self.policies = [p.name for p in cfg.policies]
        self.spec = {p.name: p for p in cfg.policies}
        self.kl_ctl = {
            p.name: (ppo.AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                     else ppo.FixedKLController(p.init_kl_coef))
            for p in cfg.policies}
        self.step = 0
        self.bad_steps = {p: 0 for p in self.policies}  # consecutive steps with a skipped update
        self.skip_count = {p: 0 for p in self.policies}  # steps with a skipped update, in all
        self.recoveries = 0  # steps redone after an actor was lost
        self._actor_pids = None  # pids of hosts + workers when their state was last known good (Ray)
        self.ledger: list[dict] = []  # prompt ids consumed per step
        self.history: list[dict] = []
        self.gen = {"max_new_tokens": cfg.generation.max_new_tokens, "min_new_tokens": cfg.generation.min_new_tokens,
                    "temperature": cfg.generation.temperature, "top_k": cfg.generation.top_k,
                    "top_p": cfg.generation.top_p, "stop_at_eos": cfg.generation.stop_at_eos}
        self.gen["scored"] = rollout_scored(cfg)  # hosts return the decode steps' logprobs and values

    # ------------------------------------------------------------ phases
    def rollout(self) -> Batch:
        """Each worker takes its share of batch_size prompts; every prompt is answered by every policy."""
        n = self.cfg.ppo.batch_size
        shares = [len(r) for r in _split(n, len(self.workers))]
        seed = (self.cfg.run.seed * 1_000_003 + self.step) * 1009
        refs = [self.workers[w].rollout.remote(self.hosts[self.worker_host[w]], k, self.policies, self.gen,
                                               seed + w * 7919)
                for w, k in enumerate(shares)]
        parts = get(refs)  # in worker order: deterministic for a seed
        prompts = [p for part in parts for p in part["prompts"]]
        P = max(len(p) for p in prompts)
        pad = 0
        prompt_ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, P - len(p):] = torch.tensor(p)
            prompt_mask[i, P - len(p):] = 1
        resp = torch.cat([part["responses"] for part in parts])
        rmask = torch.cat([part["response_mask"] for part in parts])
        extra = {}
        if all(_SCORED[0] in part for part in parts):  # the decode steps' logprobs/values: no policy pass
            extra["rollout"] = {k: torch.cat([part[k] for part in parts]) for k in _SCORED}
        return Batch(
            input_ids=torch.cat([prompt_ids, resp], 1), attention_mask=torch.cat([prompt_mask, rmask], 1),
            response_mask=rmask, response_start=P, policies=[p for part in parts for p in part["policies"]],
            prompt_ids=[i for part in parts for i in part["prompt_ids"]], extra=extra)

    def evaluate(self, batch: Batch) -> dict:
        """Split the batch's rows over the hosts; each runs one mixed-adapter pass (without the policy
        rows when the rollout brought the decode steps' logprobs and values: ppo.rollout_logprobs)."""
        rewards = [self.spec[p].reward for p in batch.policies]
        refs = []
        shards = _split(len(batch.policies), len(self.hosts))
        for h, rows in zip(self.hosts, shards):
            sl = slice(rows.start, rows.stop)
            shard = {"input_ids": batch.input_ids[sl], "attention_mask": batch.attention_mask[sl],
                     "policies": batch.policies[sl], "rewards": rewards[sl], "response_start": batch.response_start}
            if "rollout" in batch.extra:
                shard["rollout"] = {k: v[sl] for k, v in batch.extra["rollout"].items()}
            refs.append(h.forward.remote(shard))
        outs = get(refs)
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def advantages(self, batch: Batch, ev: dict) -> dict[str, dict]:
        """Per policy: KL-penalised rewards, GAE advantages (whitened) and returns."""
        out = {}
        g = self.cfg.ppo
        for p in self.policies:
            rows = batch.rows(p)
            mask = batch.response_mask[rows].float()
            scores = ev["scores_B"][rows] * self.spec[p].reward_weight
            coef = self.kl_ctl[p].value
            rewards, kl = ppo.rewards_with_kl(scores, ev["logprobs_BR"][rows], ev["ref_logprobs_BR"][rows], mask,
                                              coef, kind=g.kl_penalty)
            adv, ret = ppo.gae(rewards, ev["values_BR"][rows], mask, gamma=g.gamma, lam=g.lam)
            if g.whiten_advantages:
                adv = ppo.masked_whiten(adv, mask)
            finite = all(bool(torch.isfinite(x[mask.bool()]).all()) for x in (rewards, adv, ret)) and bool(
                torch.isfinite(scores).all())
            out[p] = {"rows": rows, "mask": mask, "scores": scores, "raw_scores": ev["scores_B"][rows], "kl": kl,
                      "kl_coef": coef, "advantages": adv, "returns": ret, "finite": finite}
        return out

    def train(self, batch: Batch, ev: dict, adv: dict) -> dict[str, dict]:
        """PPO epochs; each minibatch's rows are split over the hosts, gradients summed, one step everywhere."""
        g = self.cfg.ppo
        loss_cfg = {"cliprange": g.cliprange, "cliprange_value": g.cliprange_value, "vf_coef": g.vf_coef,
                    "micro_batch_size": g.micro_batch_size}
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 7 + self.step)
        stats = {p: [] for p in self.policies}
        skipped = {p: 0 for p in self.policies}
        active = [p for p in self.policies if adv[p]["finite"]]
        single = len(self.hosts) == 1  # nothing to sum: forward, backward and step in one host call
        for p in self.policies:
            if not adv[p]["finite"]:
                skipped[p] += 1
                log.warning("step %d, policy %r: non-finite reward/advantage; its update is skipped", self.step, p)
        for _ in range(g.ppo_epochs):
            perms = {p: torch.randperm(len(adv[p]["rows"]), generator=gen).tolist() for p in self.policies}
            for start in range(0, g.batch_size, g.mini_batch_size):
                pending = {}
                for p in active:
                    if skipped[p]:
                        continue
                    local = perms[p][start:start + g.mini_batch_size]
                    rows = [adv[p]["rows"][i] for i in local]
                    total = float(adv[p]["mask"][local].sum().clamp(min=1))
                    refs = []
                    for h, shard in zip(self.hosts, _split(len(rows), len(self.hosts))):
                        sel = [rows[i] for i in shard]
                        loc = [local[i] for i in shard]
                        mb = {"input_ids": batch.input_ids[sel], "attention_mask": batch.attention_mask[sel],
                              "response_start": batch.response_start, "mask": adv[p]["mask"][loc],
                              "old_logprobs": ev["logprobs_BR"][sel], "old_values": ev["values_BR"][sel],
                              "advantages": adv[p]["advantages"][loc], "returns": adv[p]["returns"][loc]}
                        if single:  # the gradients stay on the host
                            refs.append(h.train_minibatch.remote(p, mb, total, loss_cfg, g.max_grad_norm))
                        else:
                            refs.append(h.forward_backward.remote(p, mb, total, loss_cfg))
                    pending[p] = refs
                for p, refs in pending.items():
                    if single:
                        mb_stats, applied = get(refs[0])
                        if not applied:
                            skipped[p] += 1
                            log.warning("step %d, policy %r: non-finite loss or gradient; update skipped", self.step, p)
                        else:
                            stats[p].append(mb_stats)
                        continue
                    results = get(refs)
                    grads = {k: sum(r[0][k] for r in results) for k in results[0][0]}
                    mb_stats = {k: sum(r[1][k] for r in results) for k in results[0][1]}
                    if not (all(bool(torch.isfinite(v).all()) for v in grads.values())
                            and all(torch.isfinite(torch.tensor(v)) for v in mb_stats.values())):
                        # Never let NaN/inf reach the adapters or the optimizer state: drop this
                        # policy's remaining updates of the step.
                        skipped[p] += 1
                        log.warning("step %d, policy %r: non-finite loss or gradient; update skipped", self.step, p)
                        continue
                    grads_ref = put(grads, self.local)
                    replicas = len(self.hosts) > 1  # checksums only to compare replicas
                    sums = get([h.optim_step.remote(p, grads_ref, g.max_grad_norm, replicas) for h in self.hosts])
                    if len(set(sums)) != 1:
                        raise ReplicaDivergence(f"policy {p!r}: hosts disagree after step {self.step}: {sums}")
                    stats[p].append(mb_stats)
        out = {p: ({f"{k}_avg": sum(s[k] for s in v) / len(v) for k in v[0]} if v else {}) for p, v in stats.items()}
        for p in self.policies:
            self.bad_steps[p] = self.bad_steps[p] + 1 if skipped[p] else 0
            self.skip_count[p] += 1 if skipped[p] else 0
            out[p]["skipped/nonfinite"] = self.skip_count[p]
        return out

    # ------------------------------------------------------------ loop
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
            rows = a["rows"]
            mask = a["mask"]
            kl_seq = (a["kl"] * mask).sum(1)
            ent_seq = (ev["entropy_BR"][rows] * mask).sum(1)
            m = {
                "objective/kl": float(kl_seq.mean()),
                "objective/entropy": float(ent_seq.mean()),
                "objective/scores": float(a["raw_scores"].mean()),
                "objective/rlhf_reward": float(a["scores"].mean() - a["kl_coef"] * kl_seq.mean()),
                "objective/kl_coef": float(a["kl_coef"]),
                "val/mean": float(ppo.masked_mean(ev["values_BR"][rows], mask)),
                "returns/mean": float(ppo.masked_mean(a["returns"], mask)),
            }
            m.update(train_stats[p])
            if a["finite"]:
                self.kl_ctl[p].update(float(kl_seq.mean()), self.cfg.ppo.batch_size)
            m.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
                      "time/step_s": t3 - t0, "perf/samples_per_s": n_samples / (t3 - t0),
                      "perf/gen_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9)})
            metrics[p] = m
        if self.gold_fn is not None:
            self._gold_metrics(batch, metrics)
        self.ledger.append({"step": self.step, "prompt_ids": sorted(set(batch.prompt_ids))})
        self.last_batch = batch
        self.step += 1
        return metrics

    def _gold_metrics(self, batch: Batch, metrics: dict):
        texts = get(self.workers[0].decode.remote(
            [batch.input_ids[i, batch.response_start:][batch.response_mask[i].bool()].tolist()
             for i in range(len(batch.policies))]))
        for p in self.policies:
            scores = self.gold_fn([texts[i] for i in batch.rows(p)])
            metrics[p]["gold/score"] = float(sum(scores) / max(len(scores), 1))

    def generate_texts(self, texts: list[str], policy: str, seed: int = 0) -> list[str]:
        """Completions of `texts` under `policy` ("ref" = the reference), decoded (for evaluation)."""
        worker, host = self.workers[0], self.hosts[self.worker_host[0]]
        prompts = get(worker.encode.remote(texts))
        out = get(host.sample.remote(prompts, [policy] * len(prompts), self.gen, seed))
        rows = [r[m.bool()].tolist() for r, m in zip(out["responses"], out["response_mask"])]
        return get(worker.decode.remote(rows))

    def checksums(self) -> dict[str, list[str]]:
        return {p: get([h.checksum.remote(p) for h in self.hosts]) for p in self.policies}

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything of the run outside the policies' weights and optimizers (for checkpoints)."""
        return {
            "step": self.step, "kl_ctl": {p: c.state_dict() for p, c in self.kl_ctl.items()},
            "workers": get([w.state.remote() for w in self.workers]),
            "host_rng": get([h.rng_state.remote() for h in self.hosts]),
            "ledger": list(self.ledger), "history": list(self.history),
            "bad_steps": dict(self.bad_steps), "skip_count": dict(self.skip_count),
        }

    def set_state(self, state: dict):
        self.step = state["step"]
        for p, c in self.kl_ctl.items():
            c.load_state_dict(state["kl_ctl"][p])
        get([w.set_state.remote(s) for w, s in zip(self.workers, state["workers"])])
        get([h.set_rng_state.remote(r) for h, r in zip(self.hosts, state["host_rng"])])
        self.ledger, self.history = list(state["ledger"]), list(state["history"])
        self.bad_steps, self.skip_count = dict(state["bad_steps"]), dict(state["skip_count"])

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N atomically (policies from host 0, as bytes)."""
        import yaml

        from marl_ray import checkpoint
        from marl_ray.config import to_dict

        files = {p: get(self.hosts[0].export_policy.remote(p)) for p in self.policies}
        meta = {"base_fingerprint": get(self.hosts[0].info.remote())["fingerprint"], "policies": self.policies}
        state = self.state()
        if self._actor_pids is not None and self._pids() != self._actor_pids:
            # A restarted host would have exported its initial weights: write nothing.
            raise ActorRestarted(f"an actor was restarted before the checkpoint of step {self.step} was read")
        return checkpoint.save(self.cfg.run.out_dir, self.step, meta, state, files,
                               yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.cfg.run.keep_last)

    def load_checkpoint(self, which: str) -> Path:
        """Restore every host, worker and the learner from a checkpoint ('latest' or a folder)."""
        from marl_ray import checkpoint

        path = checkpoint.resolve(self.cfg.run.out_dir, which)
        meta, state, files = checkpoint.load(path)
        checkpoint.check_compatible(meta, get(self.hosts[0].info.remote())["fingerprint"], self.policies, path)
        for p in self.policies:
            sums = get([h.import_policy.remote(p, files[p]) for h in self.hosts])
            if len(set(sums)) != 1:
                raise ReplicaDivergence(f"policy {p!r}: hosts disagree after loading {path}: {sums}")
        self.set_state(state)
        log.info("resumed from %s (step %d)", path, self.step)
        return path

    def _pids(self) -> list[int]:
        return get([a.pid.remote() for a in list(self.hosts) + list(self.workers)])

    def _restarted(self, snap: dict) -> bool:
        """True when an actor was restarted since `snap` (or does not answer)."""
        try:
            return self._pids() != snap["pids"]
        except Exception:
            return True

    def _snapshot(self) -> dict:
        """The state at the start of a step: what a failed step is rolled back to. The actors'
        pids are read after their state: unchanged pids later prove no actor restarted meanwhile."""
        snap = {"policies": {p: get(self.hosts[0].get_state.remote(p)) for p in self.policies},
                "learner": self.state()}
        snap["pids"] = self._actor_pids = self._pids()
        return snap

    def _recover(self, snap: dict, timeout_s: float = 300.0):
        """Wait for restarted actors, then put every host and worker back to the snapshot."""
        deadline = time.monotonic() + timeout_s
        probes = [h.info for h in self.hosts] + [w.state for w in self.workers]
        for probe in probes:
            while True:
                try:
                    get(probe.remote())
                    break
                except Exception as e:  # still restarting
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"an actor did not come back within {timeout_s:.0f}s: {e}") from e
                    time.sleep(1.0)
        snap["pids"] = self._actor_pids = self._pids()  # before restoring: a restart after this shows
        for p, st in snap["policies"].items():
            sums = get([h.set_state.remote(p, st) for h in self.hosts])
            if len(set(sums)) != 1:
                raise ReplicaDivergence(f"policy {p!r}: hosts disagree after recovery: {sums}")
        self.set_state(snap["learner"])

    def fit(self, steps: int | None = None, on_step=None, max_step_retries: int = 3):
        """Run PPO steps until cfg.ppo.steps (or `steps` more); `on_step(step, metrics)` after each.

        A step that loses an actor (Ray restarts it) is rolled back to its start on every host
        and worker and redone with the same seeds: no sample is lost or counted twice. The
        rollback point of the next step is read at the end of a step, inside the same retry, and
        an actor that Ray restarted silently (it died between calls) is caught by its new pid.
        """
        from tqdm import tqdm

        end = self.cfg.ppo.steps if steps is None else self.step + steps
        start_sums = self.checksums()
        for p, s in start_sums.items():
            if len(set(s)) != 1:
                raise ReplicaDivergence(f"policy {p!r}: hosts start from different weights: {s}")
        bar = tqdm(total=end, initial=self.step, desc="ppo", unit="step", disable=not self.cfg.run.progress)
        save_every = self.cfg.run.save_every
        try:
            snap = None if self.local else self._snapshot()
            while self.step < end:
                next_snap = None
                for attempt in range(max_step_retries + 1):
                    try:
                        metrics = self.run_step()
                        if snap is not None:
                            next_snap = self._snapshot()
                            if next_snap["pids"] != snap["pids"]:
                                raise ActorRestarted(f"an actor was restarted during step {self.step - 1}")
                        break
                    except Exception as e:
                        if snap is None or attempt == max_step_retries or not (
                                _actor_lost(e) or self._restarted(snap)):
                            raise
                        self.recoveries += 1
                        log.warning("step %d lost an actor (%s); restoring and redoing the step",
                                    snap["learner"]["step"], type(e).__name__)
                        self._recover(snap)
                snap = next_snap
                self.history.append({"step": self.step - 1, "metrics": metrics})
                if self.logger is not None:
                    self.logger.log(self.step - 1, metrics)
                if on_step is not None:
                    on_step(self.step - 1, metrics)
                bad = [p for p, n in self.bad_steps.items() if n >= self.cfg.ppo.max_nonfinite_steps]
                if bad:
                    path = self._save(snap)
                    raise NonFiniteError(
                        f"policies {bad}: updates skipped for non-finite numbers {self.cfg.ppo.max_nonfinite_steps} "
                        f"steps in a row; last good state saved to {path}. Lower the learning rate or check "
                        "the reward adapter.")
                if save_every and self.step % save_every == 0 and self.step < end:
                    self._save(snap)
                first = metrics[self.policies[0]]
                bar.set_postfix(samples_s=f"{first['perf/samples_per_s']:.1f}",
                                **{p: f"{m['objective/scores']:+.2f}" for p, m in metrics.items()})
                bar.update(1)
        finally:
            bar.close()
        return self.history

    def _save(self, snap: dict | None, retries: int = 2) -> Path:
        """save_checkpoint; an actor lost meanwhile is restored to `snap` (this very state) first."""
        for attempt in range(retries + 1):
            try:
                return self.save_checkpoint()
            except Exception as e:
                if snap is None or attempt == retries or not (_actor_lost(e) or self._restarted(snap)):
                    raise
                self.recoveries += 1
                log.warning("an actor was lost while saving step %d (%s); restoring and saving again", self.step,
                            type(e).__name__)
                history = list(self.history)  # `snap` was read before this step's metrics were added
                self._recover(snap)
                self.history = history


class NonFiniteError(RuntimeError):
    """A policy's updates were skipped for NaN/inf too many steps in a row."""


def _actor_lost(e: BaseException) -> bool:
    """True for a dead or restarting actor, also when it surfaces inside another actor's task."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (RayActorError, ActorUnavailableError)):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False
