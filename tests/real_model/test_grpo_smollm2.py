"""GRPO on a real pretrained chat model: SmolLM2-135M-Instruct given as its .gguf file, conversational
prompts rendered with its ChatML template, a TRL-style reward function, through `run_ppo` on a real
private local Ray (127.0.0.1). A short run: 2 steps, one small LoRA, short replies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import reliability_utils as ru

pytestmark = pytest.mark.slow

FNS = Path(__file__).parent / "reward_fns.py"
CATEGORIES = ["fruit", "color", "animal", "country", "vegetable", "sport", "city", "flower"]


def _prompts(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.choice(CATEGORIES)
        rows.append({"messages": [{"role": "user", "content": f"Name a {c}. Answer with one word."}], "category": c})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grpo_on_smollm2_from_its_gguf_file_on_a_local_ray(smollm2, tmp_path):
    import torch
    from safetensors.torch import load_file

    from marl_ray.metrics import read_metrics
    from marl_ray.stages.ppo import run_ppo

    out = tmp_path / "run"
    cfg = ru.load({
        "model": {"base": smollm2["gguf"]},
        "rewards": [{"name": "word", "function": f"{FNS}:one_word"}],
        "policies": [{"name": "g", "reward": "word", "algorithm": "grpo", "num_generations": 4, "lr": 1e-4,
                      "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}],
        "generation": {"max_new_tokens": 8, "min_new_tokens": 1, "stop_at_eos": True},
        "ppo": {"steps": 2, "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1},
        "cluster": {"num_hosts": 1, "host_num_cpus": 1, "rollout_workers": 1},
        "data": {"prompts": str(_prompts(tmp_path / "chat.jsonl", 16, seed=0)), "max_prompt_tokens": 64},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False, "seed": 0, "log_samples": 4},
    })
    with ru.private_local_ray(num_cpus=2):
        summary = run_ppo(cfg)
    assert summary["steps"] == 2
    host = summary["hosts"][0]
    # the base's 134,515,008 weights plus the policy's LoRA (r=2 on q and v of 30 layers: 115,200)
    assert host["base_params"] == 134_515_008 + 115_200 and host["base_copies"] == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["policy"] == "g"] == [0, 1]
    for r in rows:
        assert 0.0 <= r["rewards/word/mean"] <= 1.0, r
    samples = read_metrics(out / "samples.jsonl")
    assert samples
    for s in samples:  # rendered with SmolLM2's ChatML template; the reply stops at <|im_end|>
        assert s["prompt"].startswith("<|im_start|>system\n") and s["prompt"].endswith("<|im_start|>assistant\n")
        assert "<|im_end|>" not in s["completion"]
    weights = load_file(str(Path(summary["saved"]["g"]) / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 30 * 2 and any(torch.count_nonzero(v) for v in lora_b)  # trained from zero
