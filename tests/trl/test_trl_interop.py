"""Checkpoints cross between marl_ray's drop-in and the real TRL 0.11.4, both ways, peft and full.

TRL runs in its own virtualenv, .venv-trl011 (`bash benchmarks/setup_trl011_venv.sh`: trl 0.11.4,
transformers 4.46.3, peft 0.13.2, torch 2.13.0 CPU); the test is skipped where that venv is missing.
One subprocess (trl011_peer.py) does TRL's side: it loads our folders (peft, full, full sharded),
and writes its own (peft, full, full sharded) from the same base with seeded LoRA and value-head
weights. Each side's forward pass (logits and
values) on the other side's checkpoint must agree with the writer's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lora_config, randomize_policy_

from marl_ray import AutoModelForCausalLMWithValueHead as VHModel

ROOT = Path(__file__).resolve().parents[2]
TRL_PYTHON = ROOT / ".venv-trl011" / "bin" / "python"
IDS = [[1, 5, 9, 13, 17, 21, 25]]

pytestmark = pytest.mark.skipif(not TRL_PYTHON.exists(),
                                reason="no .venv-trl011 (bash benchmarks/setup_trl011_venv.sh makes it)")


def outputs(model):
    model.eval()
    with torch.no_grad():
        logits, _, values = model(torch.tensor(IDS))
    return logits, values


def test_checkpoints_cross_with_trl_0_11_4(base_dir, tmp_path):
    ours_peft = VHModel.from_pretrained(str(base_dir), peft_config=lora_config())
    randomize_policy_(ours_peft.model, "default", seed=3)
    ours_peft.save_pretrained(tmp_path / "ours_peft")
    ours_full = VHModel.from_pretrained(str(base_dir))
    with torch.no_grad():
        ours_full.v_head.summary.weight.normal_()
    ours_full.save_pretrained(tmp_path / "ours_full")
    ours_full.save_pretrained(tmp_path / "ours_sharded", max_shard_size="100KB")

    jobs = [{"op": "load", "dir": str(tmp_path / "ours_peft"), "out": str(tmp_path / "trl_on_ours_peft.pt")},
            {"op": "load", "dir": str(tmp_path / "ours_full"), "out": str(tmp_path / "trl_on_ours_full.pt")},
            {"op": "save", "base": str(base_dir), "dir": str(tmp_path / "trl_peft"), "peft": True, "seed": 1,
             "out": str(tmp_path / "trl_peft.pt")},
            {"op": "save", "base": str(base_dir), "dir": str(tmp_path / "trl_full"), "peft": False, "seed": 2,
             "out": str(tmp_path / "trl_full.pt")},
            {"op": "save", "base": str(base_dir), "dir": str(tmp_path / "trl_sharded"), "peft": False, "seed": 4,
             "shard": "100KB", "out": str(tmp_path / "trl_sharded.pt")},
            {"op": "load", "dir": str(tmp_path / "ours_sharded"), "expect_error": True,
             "out": str(tmp_path / "trl_on_ours_sharded.pt")}]
    for job in jobs:
        job["ids"] = IDS
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    run = subprocess.run([str(TRL_PYTHON), str(Path(__file__).with_name("trl011_peer.py")), str(tmp_path / "jobs.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    # ours -> TRL 0.11.4
    for model, name, peft in ((ours_peft, "trl_on_ours_peft", True), (ours_full, "trl_on_ours_full", False)):
        trl = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert trl["is_peft"] == peft
        logits, values = outputs(model)
        torch.testing.assert_close(trl["logits"], logits, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(trl["values"], values, atol=1e-5, rtol=1e-5, msg=name)

    # TRL 0.11.4 cannot read a sharded checkpoint from a local folder (it asks the hub for the
    # shards holding v_head.*), its own included: ours can (below: TRL's sharded folder)
    error = torch.load(tmp_path / "trl_on_ours_sharded.pt", weights_only=True)["error"]
    assert error is not None and "HFValidationError" in error
    again = VHModel.from_pretrained(str(tmp_path / "ours_sharded"))
    assert torch.equal(again.v_head.summary.weight, ours_full.v_head.summary.weight)

    # TRL 0.11.4 -> ours
    assert len(list((tmp_path / "trl_sharded").glob("model-*.safetensors"))) > 1
    for name, peft in (("trl_peft", True), ("trl_full", False), ("trl_sharded", False)):
        trl = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        model = VHModel.from_pretrained(str(tmp_path / name))
        assert model.is_peft_model == peft
        for k, v in trl["v_head"].items():
            assert torch.equal(model.v_head.summary.state_dict()[k], v), (name, k)
        logits, values = outputs(model)
        torch.testing.assert_close(logits, trl["logits"], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(values, trl["values"], atol=1e-5, rtol=1e-5, msg=name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
