"""A run's checkpoints and its exported policies, written where the state is.

Without `run.storage` the driver writes checkpoint step-N to OUT/checkpoints atomically, the
policies' files sent by host 0 at checkpoint time only; with `run.storage` (a path every node
reaches, or an object store) each host writes the folders of the policies dealt to it and the
driver its own files and, last, meta.json: a checkpoint is complete or absent either way. The file
formats are `train/checkpoint.py`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from marl_ray.config import to_dict
from marl_ray.model.adapter_io import atomic_dir
from marl_ray.runtime.handles import get
from marl_ray.train import checkpoint

log = logging.getLogger(__name__)


def save(learner, state: dict | None = None):
    """Write checkpoint step-N: complete or absent. Without run.storage, the driver writes it to
    OUT/checkpoints atomically, the policies' files sent by host 0; with run.storage the hosts write
    their policies' folders there themselves (the policies dealt among them) and the driver its own
    files and, last, meta.json. `state`: the learner state to write (default: read now from the
    learner and the actors). Returns the checkpoint's folder (a storage path with run.storage)."""
    meta = {"base_fingerprint": get(learner.hosts[0].info.remote())["fingerprint"], "policies": learner.policies}
    state = learner.state() if state is None else state
    config_yaml = yaml.safe_dump(to_dict(learner.cfg), sort_keys=False)
    if learner.storage is None:
        files = {p: get(learner.hosts[0].export_policy.remote(p)) for p in learner.policies}
        learner.resilience.check()
        learner.last_checkpoint = checkpoint.save(learner.cfg.run.out_dir, state["step"], meta, state, files,
                                                  config_yaml, learner.cfg.run.keep_last)
        return learner.last_checkpoint
    rel = checkpoint.begin_stored(learner.storage, state["step"])
    n = len(learner.hosts)
    policies = learner.policies
    dealt = {h: [p for i, p in enumerate(policies) if i % n == h] for h in range(min(n, len(policies)))}
    sizes = {}
    for got in get([learner.hosts[h].write_policies.remote(learner.storage, {p: f"{rel}/policies/{p}" for p in ps})
                    for h, ps in dealt.items()]):
        sizes.update(got)
    learner.resilience.check()  # before meta.json: a checkpoint a restarted host wrote stays incomplete
    learner.last_checkpoint = checkpoint.finish_stored(learner.storage, rel, state["step"], meta, state,
                                                       config_yaml, learner.cfg.run.keep_last, sizes)
    return learner.last_checkpoint


def load(learner, which: str):
    """Restore every host, worker and the learner from a checkpoint ('latest' or a folder; of
    run.storage when set, where each host reads the policies' files itself)."""
    fingerprint = get(learner.hosts[0].info.remote())["fingerprint"]
    if learner.storage is None:
        path = checkpoint.resolve(learner.cfg.run.out_dir, which)
        meta, state, files = checkpoint.load(path)
        checkpoint.check_compatible(meta, fingerprint, learner.policies, path)
        for p in learner.policies:
            learner.hosts.import_policy(p, files[p], f"loading {path}")
    else:
        path = checkpoint.resolve_stored(learner.storage, which)
        meta, state = checkpoint.load_stored(learner.storage, path)
        checkpoint.check_compatible(meta, fingerprint, learner.policies, learner.storage.describe(path))
        folders = {p: f"{path}/policies/{p}" for p in learner.policies}
        sums = learner.hosts.all("read_policies", learner.storage, folders)
        for p in learner.policies:
            learner.hosts.agree([s[p] for s in sums], f"policy {p!r}: hosts disagree after loading {path}")
    learner.set_state(state)
    learner.last_checkpoint = path
    log.info("resumed from %s (step %d)", describe(learner, path), learner.step)
    return path


def export(learner) -> dict[str, str]:
    """The trained policies as plain peft folders (+ value head, optimizer.pt): OUT/policies/NAME, the files
    sent by host 0; or, with run.storage, STORAGE/policies/NAME written by the hosts. Returns where."""
    if learner.storage is not None:
        n = len(learner.hosts)
        get([learner.hosts[i % n].write_policies.remote(learner.storage, {p: f"policies/{p}"})
             for i, p in enumerate(learner.policies)])
        return {p: learner.storage.describe(f"policies/{p}") for p in learner.policies}
    out, saved = Path(learner.cfg.run.out_dir), {}
    for p in learner.policies:
        files = get(learner.hosts[0].export_policy.remote(p))
        with atomic_dir(out / "policies" / p) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        saved[p] = str(out / "policies" / p)
    return saved


def describe(learner, path) -> str:
    """Where a checkpoint is, for a message: its folder, or its storage's URI and path."""
    return str(path) if learner.storage is None else learner.storage.describe(str(path))
