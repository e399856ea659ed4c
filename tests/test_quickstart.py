"""The multi-adapter Quickstart (TRL's, with the import switched to marl_ray), run as written.

Only `model_name` and `rm_adapter_id` are local: the tiny Llama base and a reward adapter in
TRL RewardTrainer's format. The LoraConfig gives no target_modules: peft's default mapping for
Llama (q_proj, v_proj) applies, as it does for the Quickstart's hub models.
"""

from __future__ import annotations

import torch


def test_quickstart(base_dir, reward_dir_trl):
    model_name, rm_adapter_id = str(base_dir), str(reward_dir_trl)

    # ---- the Quickstart, verbatim
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from marl_ray import AutoModelForCausalLMWithValueHead

    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name,
        peft_config=lora_config,
        reward_adapter=rm_adapter_id,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    inputs = tokenizer(["a movie review"], return_tensors="pt")
    rewards = model.compute_reward_score(**inputs)
    # ---- end of the Quickstart

    B, T = inputs["input_ids"].shape
    assert rewards.shape == (B, T, 1)
    assert rewards.isfinite().all() and rewards.abs().max() > 0
    assert model.model.quantization == "4bit"
    assert sorted(model.model.peft.peft_config["default"].target_modules) == ["q_proj", "v_proj"]

    # a PPO step's forward + backward on the policy works afterwards
    model.train()
    logits, _, values = model(**inputs)
    assert logits.shape == (B, T, model.model.base.config.vocab_size) and values.shape == (B, T)
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])
    loss = -logprobs.mean() + values.pow(2).mean()
    loss.backward()
    params = model.model.policy_parameters("default")
    assert params and all(p.grad is not None and p.grad.isfinite().all() for p in params)
    assert any(p.grad.abs().max() > 0 for n, p in model.model.policy_state("default").items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "reward_adapter" in n or "score" in n)
    # the score did not change by training mode or the backward pass
    model.eval()
    torch.testing.assert_close(model.compute_reward_score(**inputs), rewards, atol=1e-6, rtol=0)
