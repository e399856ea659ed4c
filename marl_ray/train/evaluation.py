"""What the learner measures besides training: held-out evaluation, the gold metric, sample logs,
and completions for a demo's report. Functions over a `Learner` (train/loop.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from marl_ray.algorithms.advantages import PolicyAdvantages
from marl_ray.data.prompts import is_conversation
from marl_ray.model.sampling import pad_left
from marl_ray.runtime.handles import get
from marl_ray.train.batch import Batch


def log_samples(learner, batch, adv: dict[str, PolicyAdvantages]):
    """The first run.log_samples rows of each policy: prompt, completion, total reward, the row's fields."""
    k = learner.cfg.run.log_samples
    picked = [(p, j, adv[p].rows[j]) for p in learner.policies for j in range(min(k, len(adv[p].rows)))]
    prompts, completions = learner.decoded(batch)
    learner.logger.log_samples(learner.step, [
        {"policy": p, "prompt": prompts[i], "completion": completions[i], "reward": float(adv[p].raw_scores[j]),
         **(batch.columns[i] if batch.columns else {})}
        for p, j, i in picked])


def gold_metrics(learner, batch, metrics: dict):
    """Each policy's mean gold-oracle score of its rows' completions (a metric only, never a reward)."""
    texts = learner.decoded(batch)[1]
    for p in learner.policies:
        scores = learner.gold_fn([texts[i] for i in batch.rows(p)])
        metrics[p]["gold/score"] = float(sum(scores) / max(len(scores), 1))


def generate_texts(learner, texts: list[str], policy: str, seed: int = 0) -> list[str]:
    """Completions of `texts` under `policy` ("ref" = the reference), decoded (for evaluation)."""
    worker, host = learner.workers[0], learner.hosts[learner.worker_host[0]]
    prompts = get(worker.encode.remote(texts))
    out = get(host.sample.remote(prompts, [policy] * len(prompts), learner.sampling, seed))
    rows = [r[m.bool()].tolist() for r, m in zip(out.responses, out.response_mask)]
    return get(worker.decode.remote(rows))


def heldout(learner, prompts: list, columns: list[dict], seed: int = 0) -> dict[str, dict]:
    """Each policy on held-out prompts (data.eval_prompts / eval_fraction): one completion per prompt,
    sampled at the run's settings under a fixed seed, scored by the policy's own rewards as in training.
    Per policy: eval/reward (the total before reward_weight), eval/rewards/NAME/mean|std, eval/length."""
    worker, host = learner.workers[0], learner.hosts[learner.worker_host[0]]
    ids, texts, stop = get(worker.prepare.remote(prompts))
    n = len(ids)
    policies = [p for p in learner.policies for _ in range(n)]
    settings = replace(learner.sampling, scored=False, stop_token_ids=stop)
    out = get(host.sample.remote(ids * len(learner.policies), policies, settings, seed))
    prompt_ids, prompt_mask = pad_left(ids * len(learner.policies), 0)
    batch = Batch(input_ids=torch.cat([prompt_ids, out.responses], 1),
                  attention_mask=torch.cat([prompt_mask, out.response_mask], 1),
                  response_mask=out.response_mask, response_start=prompt_ids.shape[1], policies=policies,
                  prompt_ids=list(range(n)) * len(learner.policies), texts=texts * len(learner.policies),
                  columns=list(columns) * len(learner.policies),
                  messages=[p if is_conversation(p) else None for p in prompts] * len(learner.policies))
    ev = learner.evaluate(batch) if any(learner.adapter[p] for p in learner.policies) else None
    totals, stats = learner.rewards(batch, ev)
    metrics = {}
    for p in learner.policies:
        rows = batch.rows(p)
        metrics[p] = {"eval/reward": float(totals[rows].mean()),
                      "eval/length": float(out.response_mask[rows].sum(1).float().mean()),
                      **{f"eval/{k}": v for k, v in stats[p].items()}}
    if learner.gold_fn is not None:
        gold_metrics(learner, batch, metrics)
        for p in learner.policies:
            metrics[p]["eval/gold/score"] = metrics[p].pop("gold/score")
    return metrics
