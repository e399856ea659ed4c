"""Run checkpoints: written atomically, the last K kept, checked against the config on resume.

    OUT/checkpoints/step-000012/
      meta.json            step, base fingerprint, policy names, time (human-readable)
      state.pt             learner state: KL controllers, rollout-worker stream positions,
                           host RNG states, prompt ledger, metrics history
      config.yaml          the run config
      policies/NAME/       plain peft folder + value_head.safetensors + optimizer.pt

Two routes. Without `run.storage` the files of each policy come from a host as bytes and the driver
writes them, so a learner on another node than the host needs no shared file system; a crash
mid-write leaves only a dot-prefixed temp folder, which is never listed and is cleaned up by the
next save. With `run.storage` (a path every node reaches, or an object store: `marl_ray.storage`)
the hosts write their policies' folders themselves and the driver writes state.pt, config.yaml and,
last, meta.json, which lists every file: a checkpoint is complete when its meta.json is there,
absent otherwise (object stores have no rename), and the next save removes an incomplete one.
"""

from __future__ import annotations

import io
import json
import posixpath
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


# ------------------------------------------------------------------ in run.storage, written by the hosts
def stored_dir(step: int) -> str:
    return f"checkpoints/{PREFIX}{step:06d}"


def list_stored(storage) -> list[str]:
    """Complete checkpoints in `storage` (their meta.json written), oldest first, as storage paths."""
    names = [n for n in storage.listdir("checkpoints") if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    done = [n for n in names if storage.exists(f"checkpoints/{n}/meta.json")]
    return [f"checkpoints/{n}" for n in sorted(done, key=lambda n: int(n[len(PREFIX):]))]


def begin_stored(storage, step: int) -> str:
    """The folder of step `step`'s checkpoint, emptied, and incomplete ones (no meta.json) removed."""
    for n in storage.listdir("checkpoints"):
        if n.startswith(PREFIX) and not storage.exists(f"checkpoints/{n}/meta.json"):
            storage.delete(f"checkpoints/{n}")
    rel = stored_dir(step)
    storage.delete(rel)
    return rel


def finish_stored(storage, rel: str, step: int, meta: dict, state: dict, config_yaml: str, keep_last: int,
                  policy_files: dict[str, dict[str, int]]) -> str:
    """The driver's files, then meta.json (naming every file and its size) last; then the oldest beyond
    keep_last go (their meta.json first, so a crash mid-delete leaves an incomplete folder, never listed)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write(f"{rel}/state.pt", buf.getvalue())
    storage.write(f"{rel}/config.yaml", config_yaml.encode())
    files = {f"policies/{p}/{name}": size for p, names in policy_files.items() for name, size in names.items()}
    files.update({"state.pt": len(buf.getvalue()), "config.yaml": len(config_yaml.encode())})
    storage.write(f"{rel}/meta.json", json.dumps({**meta, "step": step, "time": time.time(), "files": files},
                                                 indent=2).encode())
    for old in list_stored(storage)[:-keep_last]:
        storage.delete(f"{old}/meta.json")
        storage.delete(old)
    return rel


def resolve_stored(storage, which: str) -> str:
    """'latest', a folder name (step-000012) or a storage path (checkpoints/step-000012)."""
    if which == "latest":
        found = list_stored(storage)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {storage.describe('checkpoints')}")
        return found[-1]
    rel = which if "/" in which else f"checkpoints/{which}"
    if not storage.exists(f"{rel}/meta.json"):
        raise FileNotFoundError(f"--resume {which}: not a complete checkpoint in {storage.describe()} (no meta.json)")
    return rel


def load_stored(storage, rel: str) -> tuple[dict, dict]:
    """(meta, state) of a stored checkpoint; the hosts read the policies' folders themselves. Every file
    meta.json lists must be there, at its size."""
    meta = json.loads(storage.read(f"{rel}/meta.json"))
    for name, size in meta.get("files", {}).items():
        got = storage.size(posixpath.join(rel, name))
        if got != size:
            raise FileNotFoundError(f"checkpoint {storage.describe(rel)}: {name} is {'missing' if got is None else got}"
                                    f" where its meta.json lists {size} bytes")
    state = torch.load(io.BytesIO(storage.read(f"{rel}/state.pt")), map_location="cpu", weights_only=False)
    return meta, state

