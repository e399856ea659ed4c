"""train/checkpoint.py on its own: the folder layout, the last K kept, resolve, load, compatibility."""

from __future__ import annotations

import json

import pytest
import torch

from marl_ray.train import checkpoint


def _save(out, step, keep_last=2, policies=("a", "b")):
    files = {p: {"adapter_model.safetensors": f"{p}-{step}".encode(), "optimizer.pt": bytes([step])} for p in policies}
    state = {"step": step, "ledger": [{"step": s} for s in range(step)], "tensor": torch.arange(step)}
    return checkpoint.save(out, step, {"base_fingerprint": "fp", "policies": list(policies)}, state, files,
                           "run: {}\n", keep_last)


def test_save_then_load_gives_back_what_was_saved(tmp_path):
    path = _save(tmp_path, 3)
    assert path == tmp_path / "checkpoints" / "step-000003"
    meta, state, files = checkpoint.load(path)
    assert meta["step"] == 3 and meta["policies"] == ["a", "b"] and meta["base_fingerprint"] == "fp"
    assert state["step"] == 3 and torch.equal(state["tensor"], torch.arange(3)) and len(state["ledger"]) == 3
    assert files == {p: {"adapter_model.safetensors": f"{p}-3".encode(), "optimizer.pt": bytes([3])}
                     for p in ("a", "b")}
    assert (path / "config.yaml").read_text() == "run: {}\n"
    assert json.loads((path / "meta.json").read_text())["time"] > 0


def test_keeps_the_last_k_in_step_order_and_resolves_latest(tmp_path):
    for step in (1, 2, 10, 11):  # 10 sorts before 2 as text: the order must be numeric
        _save(tmp_path, step, keep_last=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000002", "step-000010", "step-000011"]
    assert checkpoint.resolve(tmp_path, "latest").name == "step-000011"
    folder = checkpoint.list_checkpoints(tmp_path)[0]
    assert checkpoint.resolve(tmp_path, str(folder)) == folder
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_interrupted_writes_are_never_listed_and_cleaned_by_the_next_save(tmp_path):
    _save(tmp_path, 1)
    stray = tmp_path / "checkpoints" / ".step-000002.tmp-123"
    stray.mkdir()
    (stray / "meta.json").write_text("{}")
    no_meta = tmp_path / "checkpoints" / "step-000003"  # a folder without meta.json is not a checkpoint
    no_meta.mkdir()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000001"]
    _save(tmp_path, 4)
    assert not stray.exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000001", "step-000004"]


def test_resolve_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        checkpoint.resolve(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        checkpoint.resolve(tmp_path, str(tmp_path))


def test_check_compatible_names_the_difference(tmp_path):
    path = _save(tmp_path, 1)
    meta, _, _ = checkpoint.load(path)
    checkpoint.check_compatible(meta, "fp", ["a", "b"], path)  # the same run: fine
    with pytest.raises(checkpoint.CheckpointMismatch, match="fingerprint|base"):
        checkpoint.check_compatible(meta, "other", ["a", "b"], path)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"not in the checkpoint: \['c'\]"):
        checkpoint.check_compatible(meta, "fp", ["a", "b", "c"], path)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"not in the config: \['b'\]"):
        checkpoint.check_compatible(meta, "fp", ["a"], path)
