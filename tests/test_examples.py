"""examples/qwen2_chat as the README runs it (fewer steps): a conversational data set on a
Qwen2-shaped base with a chat template, GRPO against a verifiable reward on a column, held-out prompts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_qwen2_chat_example_runs_as_documented(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    assets = tmp_path / "qwen2-chat"
    made = subprocess.run([sys.executable, "examples/qwen2_chat/make_assets.py", str(assets)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads((assets / "base" / "config.json").read_text())["model_type"] == "qwen2"
    out = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-m", "marl_ray", "ppo", "--config", "examples/qwen2_chat/config.yaml",
         "--set", f"model.base={assets / 'base'}", "--set", f"data.prompts={assets / 'prompts.jsonl'}",
         "--set", f"run.out_dir={out}", "--set", "ppo.steps=2", "--set", "run.eval_every=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "eval after 0 steps, policy chat:" in proc.stdout and "eval after 2 steps, policy chat:" in proc.stdout
    summary = json.loads((out / "ppo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["steps"] == [0, 2] and summary["eval"]["prompts"] == 16
    assert "rewards/letter/mean" in summary["policies"]["chat"]
    assert (out / "policies" / "chat" / "adapter_model.safetensors").exists()
    assert "'loss'" not in proc.stderr  # a clean console: no trainer dicts, no third-party chatter
    assert "FutureWarning" not in proc.stderr and "kernels-community" not in proc.stderr
