"""Run checkpoints: written atomically, the last K kept, checked against the config on resume.

    OUT/checkpoints/step-000012/
      meta.json            step, base fingerprint, policy names, time (human-readable)
      state.pt             learner state: KL controllers, rollout-worker stream positions,
                           host RNG states, prompt ledger, metrics history
      config.yaml          the run config
      policies/NAME/       plain peft folder + value_head.safetensors + optimizer.pt

The files of each policy come from a host as bytes, so a learner on another node than the
host needs no shared file system. A crash mid-write leaves only a dot-prefixed temp folder,
which is never listed and is cleaned up by the next save.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from marl_ray.model.adapter_io import atomic_dir

PREFIX = "step-"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run's config; the message names the difference."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are skipped)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(out_dir: str | Path, which: str) -> Path:
    """'latest' or a checkpoint folder path."""
    if which == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {checkpoint_root(out_dir)}")
        return found[-1]
    p = Path(which)
    if not (p / "meta.json").exists():
        raise FileNotFoundError(f"--resume {which}: not a checkpoint folder (no meta.json)")
    return p


def save(out_dir: str | Path, step: int, meta: dict, state: dict, policy_files: dict[str, dict[str, bytes]],
         config_yaml: str, keep_last: int) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*"):  # temp folders of writes that were killed
        shutil.rmtree(stale, ignore_errors=True)
    target = root / f"{PREFIX}{step:06d}"
    with atomic_dir(target) as tmp:
        for policy, files in policy_files.items():
            folder = tmp / "policies" / policy
            folder.mkdir(parents=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "time": time.time()}, indent=2))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        # Unlisted first (dot-prefixed), then deleted: a crash mid-delete leaves no listed, gutted folder.
        doomed = old.with_name(f".{old.name}.del")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def load(path: str | Path) -> tuple[dict, dict, dict[str, dict[str, bytes]]]:
    """(meta, state, policy files) of a checkpoint folder."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    files = {}
    for folder in sorted((path / "policies").iterdir()):
        files[folder.name] = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return meta, state, files


def check_compatible(meta: dict, fingerprint: str, policies: list[str], path: Path):
    """Refuse a checkpoint of another base or another set of policies, naming the difference."""
    if meta.get("base_fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"checkpoint {path} was made on a different base (fingerprint {meta.get('base_fingerprint')}, this "
            f"config's base is {fingerprint}): resume with the same model.base")
    have, want = list(meta.get("policies", [])), list(policies)
    if sorted(have) != sorted(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CheckpointMismatch(
            f"checkpoint {path} holds policies {have}, the config lists {want}"
            + (f"; not in the checkpoint: {missing}" if missing else "")
            + (f"; not in the config: {extra}" if extra else ""))
