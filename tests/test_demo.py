"""The main job end to end: `marl-ray demo --quick` from the command line, then stage 3 alone
from the folders stages 1 and 2 wrote. Real SFT, reward training and PPO on a local Ray."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(args, cwd, timeout):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "marl_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = _run(["demo", "--out", str(out), "--quick", "--seed", "0"], cwd=out.parent, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_summary_shows_real_improvement(demo):
    out, proc = demo
    s = json.loads((out / "summary.json").read_text())
    up, down = s["policies"]["up"], s["policies"]["down"]
    for p in (up, down):
        assert {"gold_before", "gold_after", "kl"} <= set(p)
    # The gold oracle never enters the reward; these margins are what the learned reward bought.
    assert up["gold_after"] > up["gold_before"] + 0.2, up
    assert down["gold_after"] < down["gold_before"] - 0.1, down
    assert 0 < up["kl"] < 60 and 0 < down["kl"] < 60  # bounded by the KL penalty
    assert s["reward_accuracy"] > 0.65  # held-out pairwise accuracy, chance is 0.5
    assert s["base_copies"] == 1 and s["peak_rss_mib"] > 0
    assert "| up |" in proc.stdout and "| down |" in proc.stdout  # the table printed at the end
    for p in ("up", "down"):
        assert (out / "plots" / f"{p}.png").stat().st_size > 1000
        assert (out / "ppo" / "policies" / p / "adapter_model.safetensors").exists()
    samples = json.loads((out / "samples.json").read_text())
    assert samples["up"]["before"] and samples["up"]["after"]
    assert list((out / "ppo" / "tensorboard").iterdir())


def test_policy_folder_loads_with_plain_peft(demo):
    out, _ = demo
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "sft" / "base")
    model = PeftModel.from_pretrained(base, out / "ppo" / "policies" / "up")
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_stage3_runs_alone_on_what_stages_1_and_2_wrote(demo, tmp_path):
    out, _ = demo
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"""
model: {{base: {out / 'sft' / 'base'}}}
rewards: [{{name: rm, path: {out / 'reward' / 'adapter'}}}]
policies: [{{name: solo, reward: rm}}]
generation: {{max_new_tokens: 6}}
ppo: {{steps: 2, batch_size: 4, mini_batch_size: 2}}
cluster: {{runtime: inprocess}}
run: {{out_dir: {tmp_path / 'ppo'}, progress: false}}
""")
    proc = _run(["ppo", "--config", str(cfg)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 1 policy solo: objective/scores=" in proc.stdout
    assert (tmp_path / "ppo" / "policies" / "solo" / "adapter_model.safetensors").exists()
