"""The seed document's snippets (TRL's "Multi Adapter RL" page, ../shared/SEED-multi-adapter-rl.txt),
run as written with one change: the import of AutoModelForCausalLMWithValueHead.

Local stand-ins: `model_name` is the tiny Llama base, `rm_adapter_id` a reward adapter in TRL
RewardTrainer's format. `PPOTrainer(model=model, ...)` is TRL's trainer, not part of the drop-in:
`trainer` here is an object whose `.model` is the model, as PPOTrainer's is; one hand-written PPO-like
update stands for its step. The quickstart, its "advanced usage" (a second policy adapter added
with peft's own API, then `ppo_adapter_name`) and the 8-bit and 4-bit variants each run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.mark.parametrize("variant", ["quickstart", "8bit", "4bit"])
def test_seed_document_snippets(base_dir, reward_dir_trl, tokenizer, variant):
    model_name, rm_adapter_id = str(base_dir), str(reward_dir_trl)
    inputs = tokenizer(["a movie review", "the acting was great"], return_tensors="pt", padding=True)

    # ---- the document's code, with `from marl_ray import ...` for `from trl import ...`
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from marl_ray import AutoModelForCausalLMWithValueHead

    # PPO adapter
    lora_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if variant == "quickstart":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            model_name,
            peft_config=lora_config,
            reward_adapter=rm_adapter_id,
        )
    else:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            model_name,
            peft_config=lora_config,
            reward_adapter=rm_adapter_id,
            quantization_config=BitsAndBytesConfig(**{f"load_in_{variant}": True}),
        )
    trainer = SimpleNamespace(model=model)  # stands for PPOTrainer(model=model, ...)
    rewards = trainer.model.compute_reward_score(**inputs)

    # "Advanced usage": a second policy adapter on the same base, added the peft way
    model.pretrained_model.add_adapter("policy_1", lora_config)
    adapter_name_policy_1 = "policy_1"
    rewards_1 = trainer.model.compute_reward_score(**inputs, ppo_adapter_name=adapter_name_policy_1)
    # ---- end of the document's code

    B, T = inputs["input_ids"].shape
    assert rewards.shape == (B, T, 1) and rewards.isfinite().all() and rewards.abs().max() > 0
    torch.testing.assert_close(rewards_1, rewards, atol=0, rtol=0)  # the score does not depend on the policy
    assert model.model.quantization == ("none" if variant == "quickstart" else variant)
    assert model.active == model.pretrained_model.active_adapter == "policy_1"
    assert model.model.policies == ["default", "policy_1"]

    # one PPO-like update of the active policy: its LoRA and value head get gradients, nothing else
    model.train()
    logits, _, values = model(**inputs)
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])
    (-logprobs.mean() + values.pow(2).mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".policy_1." in n or n.startswith("v_head.") for n in with_grad)
    assert any(".lora_B.policy_1." in n for n in with_grad) and "v_head.summary.weight" in with_grad
    model.eval()
    real = inputs["attention_mask"].bool()  # scores at padding positions mean nothing
    torch.testing.assert_close(trainer.model.compute_reward_score(**inputs)[real], rewards[real], atol=1e-5, rtol=0)
