"""The three stages end to end on every architecture of `marl_ray.data.tiny.ARCHITECTURES`: SFT ->
reward adapter -> PPO (two policies, PPO and GRPO, default and all-linear LoRA targets), each stage's
output read by the next, on tiny random models built locally (seeded), with the default LoRA targets.

* each architecture once on an fp32 base: full SFT, reward adapter, PPO in-process;
* a subset on 4-bit, 8-bit and bf16 bases: LoRA SFT on the quantized base (QLoRA), the reward adapter on
  it, PPO with the SFT adapter as reference and as the policy's start;
* Phi-3 (fused projections) through PPO on a real local Ray (127.0.0.1);
* a target_modules entry that matches nothing is refused by each stage before any work.

Steps are few: what is tested is that every stage runs and hands its output on, not that it learns.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

import reliability_utils as ru
from marl_ray.config import ConfigError, LoraSpec
from marl_ray.data.tiny import ARCHITECTURES
from marl_ray.model.decoding import FAMILIES
from marl_ray.stages.reward import RewardConfig, RewardLoraSpec, run_reward
from marl_ray.stages.sft import SFTConfig, run_sft

SFT_FAST = dict(corpus_size=200, steps=2, batch_size=8, max_len=32, samples=2, save_every=0, warmup_steps=0,
                progress=False)
REWARD_FAST = dict(n_pairs=32, n_eval_pairs=16, steps=2, batch_size=8, max_len=32, save_every=0, warmup_steps=0,
                   progress=False, lora=RewardLoraSpec(r=4, alpha=8))


@pytest.fixture(scope="module")
def arch_base(tmp_path_factory):
    """arch -> a tiny random base of that architecture with a tokenizer trained on the embedded domain."""
    from marl_ray.data.domain import corpus
    from marl_ray.data.tiny import build_tiny

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny(tmp_path_factory.mktemp(f"stages_{arch}") / "base", texts=corpus(300, seed=0),
                                     arch=arch, vocab_size=256)
        return cache[arch]

    return get


def ppo_config(base: str, reward: str, out: Path, runtime: str = "inprocess", model: dict | None = None,
               up: dict | None = None) -> dict:
    """Two policies on one base: `up` (PPO, the default targets) and `down` (GRPO, all-linear)."""
    return {
        "model": {"base": base, **(model or {})},
        "rewards": [{"name": "rm", "path": reward}],
        "policies": [{"name": "up", "reward": "rm", "lr": 1e-3, "lora": {"r": 4, "alpha": 8}, **(up or {})},
                     {"name": "down", "reward": "rm", "reward_weight": -1.0, "lr": 1e-3, "algorithm": "grpo",
                      "num_generations": 2, "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}],
        "generation": {"max_new_tokens": 4},
        "ppo": {"steps": 1, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1},
        "cluster": {"runtime": runtime, "rollout_workers": 1, "host_num_cpus": 1},
        "run": {"out_dir": str(out), "tensorboard": False, "progress": False},
    }


def check_ppo(summary: dict, arch: str, base: str, quantization: str = "none"):
    """One step of both policies ran with finite metrics (sampled by the lean decode loop on the families it
    serves, decoding.FAMILIES, by HF generate on the others); the saved policies load back onto the base."""
    from marl_ray.model import MultiAdapterModel

    assert summary["steps"] == 1 and set(summary["policies"]) == {"up", "down"}
    for p, metrics in summary["policies"].items():
        assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("objective/", "loss/"))), (p, metrics)
    host = summary["hosts"][0]
    assert host["quantization"] == quantization and host["base_copies"] == 1
    assert host["sampler"] == ("lean" if arch in FAMILIES else "hf")
    m = MultiAdapterModel.from_pretrained(base, quantization=quantization)
    m.load_policy("up", summary["saved"]["up"])
    m.load_policy("down", summary["saved"]["down"], value_head=False)
    assert set(m.policies) == {"up", "down"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_three_stages_on_an_fp32_base(arch_base, arch, tmp_path):
    from marl_ray.stages.ppo import run_ppo

    sft = run_sft(SFTConfig(base=str(arch_base(arch)), out_dir=str(tmp_path / "sft"), mode="full", **SFT_FAST))
    assert sft["steps"] == 2 and math.isfinite(sft["eval_loss"]) and len(sft["samples"]) == 2
    rw = run_reward(RewardConfig(base=sft["base"], out_dir=str(tmp_path / "reward"), **REWARD_FAST))
    assert rw["steps"] == 2 and 0 <= rw["reward_accuracy"] <= 1
    summary = run_ppo(ru.load(ppo_config(sft["base"], rw["adapter"], tmp_path / "ppo")))
    check_ppo(summary, arch, sft["base"])


# A subset of architecture x precision that keeps the suite's time: each quantization on two architectures
# (fused or Conv1D layers among them), bf16 on two more. MARL_RAY_ARCH_MATRIX=1 runs all 24 (about 1.5 min
# more on 2 cores): the table of docs/architectures.md.
PRECISION_RUNS = [("phi3", "4bit"), ("gpt2", "8bit"), ("gemma2", "4bit"), ("qwen3", "8bit"), ("gemma3", "bf16"),
                  ("mistral", "bf16")]
if os.environ.get("MARL_RAY_ARCH_MATRIX") == "1":
    PRECISION_RUNS = [(a, p) for a in ARCHITECTURES for p in ("bf16", "8bit", "4bit")]


@pytest.mark.parametrize("arch,precision", PRECISION_RUNS)
def test_three_stages_on_a_quantized_or_bf16_base(arch_base, arch, precision, tmp_path):
    """QLoRA SFT (LoRA on the 4/8-bit base; bf16: on the fp32 base), the reward adapter on the same base, then
    PPO on it with the SFT adapter as the reference and as policy up's start: up's KL starts at 0."""
    from marl_ray.stages.ppo import run_ppo

    base = str(arch_base(arch))
    quantization = precision if precision != "bf16" else "none"
    sft = run_sft(SFTConfig(base=base, out_dir=str(tmp_path / "sft"), mode="lora", quantization=quantization,
                            lora=LoraSpec(r=4, alpha=8), **SFT_FAST))
    assert math.isfinite(sft["eval_loss"]) and Path(sft["adapter"]).is_dir()
    rw = run_reward(RewardConfig(base=base, out_dir=str(tmp_path / "reward"), quantization=quantization,
                                 **REWARD_FAST))
    assert rw["steps"] == 2
    model = {"quantization": quantization, "dtype": "bf16" if precision == "bf16" else "fp32",
             "reference_adapter": sft["adapter"]}
    cfg = ppo_config(base, rw["adapter"], tmp_path / "ppo", model=model, up={"init_from": sft["adapter"]})
    cfg["ppo"]["rollout_logprobs"] = False  # old logprobs from the pass that scores the reference (bf16: the
    # decode steps' would differ from it by rounding, README)
    summary = run_ppo(ru.load(cfg))
    check_ppo(summary, arch, base, quantization)
    assert abs(summary["policies"]["up"]["objective/kl"]) < 1e-4, summary["policies"]["up"]


# ------------------------------------------------------------------------------------ bad targets
def test_a_target_that_matches_nothing_is_refused_before_any_work(arch_base, tmp_path):
    """Llama names on a GPT-2 base: each stage refuses with the field, the name and the base's layer names
    before it writes anything (SFT, reward) or starts Ray (PPO)."""
    import ray

    from marl_ray.stages.ppo import run_ppo

    base = str(arch_base("gpt2"))
    names = "its linear layers are named c_attn, c_fc, c_proj"
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: 'q_proj', 'v_proj' match no module of this "
                                          r"base \(gpt2\); " + names):
        run_sft(SFTConfig(base=base, out_dir=str(tmp_path / "sft"), mode="lora",
                          lora=LoraSpec(target_modules=("q_proj", "v_proj")), **SFT_FAST))
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: 'o_proj' matches no module .*" + names):
        run_reward(RewardConfig(base=base, out_dir=str(tmp_path / "reward"),
                                **{**REWARD_FAST, "lora": RewardLoraSpec(target_modules=("c_attn", "o_proj"))}))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "reward").exists()
    cfg = ppo_config(base, "unused", tmp_path / "ppo", runtime="ray")
    cfg["rewards"] = [{"name": "rm", "function": str(Path(__file__).parents[1] / "train/reward_fns/chat.py") + ":short"}]
    cfg["policies"][1]["lora"]["target_modules"] = ["c_attn", "gate_proj"]
    was_up = ray.is_initialized()  # False when this module runs on its own (the Ray tests below come later)
    with pytest.raises(ConfigError, match=r"^policies\[1\]\.lora\.target_modules: 'gate_proj' matches no module"):
        run_ppo(ru.load(cfg))
    assert ray.is_initialized() == was_up and not (tmp_path / "ppo").exists()


# ------------------------------------------------------------------------------------ real Ray
@pytest.fixture(scope="module")
def local_ray():
    with ru.private_local_ray(num_cpus=2) as tmp:
        yield tmp


@pytest.mark.parametrize("arch", ["phi3"])
def test_ppo_on_ray(arch_base, arch, local_ray, tmp_path):
    """PPO on a real local Ray (host and rollout worker actors) on Phi-3, whose fused projections failed
    with Llama's default names: its default (qkv_proj) and all-linear resolve in the host actor. (Once:
    Ray adds nothing per architecture that the in-process runs above do not cover.)"""
    from marl_ray.stages.ppo import run_ppo

    base = str(arch_base(arch))
    rw = run_reward(RewardConfig(base=base, out_dir=str(tmp_path / "reward"), **REWARD_FAST))
    summary = run_ppo(ru.load(ppo_config(base, rw["adapter"], tmp_path / "ppo", runtime="ray")), keep_ray=True)
    check_ppo(summary, arch, base)
    assert summary["hosts"][0]["node_id"] != "local"  # it ran in a Ray actor
