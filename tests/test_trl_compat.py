"""marl_ray.AutoModelForCausalLMWithValueHead: the TRL (<= 0.11) multi-adapter API, fixed."""

from __future__ import annotations

import pytest
import torch

from conftest import lora_config, pad_batch, randomize_policy_
from marl_ray import AutoModelForCausalLMWithValueHead


@pytest.fixture(scope="module")
def trl_model(base_dir, reward_dir_trl):
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(base_dir), peft_config=lora_config(), reward_adapter=str(reward_dir_trl),
        quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model.add_policy("policy_1", lora_config(), seed=5)
    randomize_policy_(model.model, "default", seed=1)
    randomize_policy_(model.model, "policy_1", seed=2)
    return model


@pytest.fixture(autouse=True)
def reset_active_and_mode(trl_model):
    """The model is shared by this module's tests: each starts with "default" active, in eval mode."""
    trl_model.set_adapter("default")
    trl_model.eval()
    yield


@pytest.fixture
def inputs(tokenizer):
    ids, mask = pad_batch([tokenizer(t)["input_ids"] for t in ("a movie review", "the plot was boring and slow")],
                          tokenizer.pad_token_id, "right")
    return {"input_ids": ids, "attention_mask": mask}


def modes(model):
    return [m.training for m in model.modules()]


def test_from_pretrained_8bit_with_reward_adapter(trl_model, inputs):
    m = trl_model
    assert m.model.quantization == "8bit"
    assert m.is_peft_model and m.supports_rm_adapter and m.rm_adapter_name == "reward_adapter"
    assert m.active == "default" and set(m.model.policies) == {"default", "policy_1"}
    B, T = inputs["input_ids"].shape
    logits, loss, values = m(**inputs)
    assert loss is None
    assert logits.shape == (B, T, m.model.base.config.vocab_size) and values.shape == (B, T)
    assert logits.isfinite().all() and values.isfinite().all()
    scores = m.compute_reward_score(**inputs)
    assert scores.shape == (B, T, 1) and scores.isfinite().all()
    assert not scores.requires_grad
    for n, p in m.named_parameters():  # scoring left the reward adapter and the base frozen
        if ".reward_adapter." in n or n.startswith("model.score_heads") or "base_layer" in n:
            assert not p.requires_grad, n


def test_ppo_adapter_name_is_honoured(trl_model, inputs):
    m = trl_model
    with torch.no_grad():
        m.set_adapter("default")
        out_default = m(**inputs)
        m.set_adapter("policy_1")
        out_policy_1 = m(**inputs)
    assert (out_default[0] - out_policy_1[0]).abs().max() > 1e-3  # the policies differ
    assert (out_default[2] - out_policy_1[2]).abs().max() > 1e-3

    def assert_active(want):
        with torch.no_grad():
            got = m(**inputs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])

    m.set_adapter("default")
    s1 = m.compute_reward_score(**inputs, ppo_adapter_name="policy_1")
    assert m.active == "policy_1"
    assert_active(out_policy_1)
    s2 = m.compute_reward_score(**inputs)  # no argument: the previously active policy stays
    assert m.active == "policy_1"
    assert_active(out_policy_1)
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)  # the score does not depend on the policy
    m.compute_reward_score(**inputs, ppo_adapter_name="default")
    assert_active(out_default)
    s3 = m.compute_reward_score(**inputs)
    assert m.active == "default"
    torch.testing.assert_close(s1, s3, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no policy adapter named 'nope'"):
        m.compute_reward_score(**inputs, ppo_adapter_name="nope")
    assert m.active == "default"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modes_are_restored(trl_model, inputs, mode):
    m = trl_model
    getattr(m, mode)()
    before = modes(m)
    assert all(before) if mode == "train" else not any(before)
    m.compute_reward_score(**inputs, ppo_adapter_name="policy_1")
    assert modes(m) == before
    m.compute_reward_score(**inputs)
    assert modes(m) == before
    m.reward_scores(**inputs)
    assert modes(m) == before
    m.model.evaluate(inputs["input_ids"], inputs["attention_mask"], ["default", "policy_1"],
                     ["reward_adapter"] * 2, response_start=2)
    assert modes(m) == before


def test_reward_scores_read_the_last_real_token(trl_model, inputs):
    m = trl_model
    per_token = m.compute_reward_score(**inputs)
    last = inputs["attention_mask"].sum(1) - 1  # right padding
    want = per_token[torch.arange(per_token.shape[0]), last, 0]
    torch.testing.assert_close(m.reward_scores(**inputs), want, atol=1e-6, rtol=0)
    assert not torch.equal(m.reward_scores(**inputs), per_token[:, -1, 0])  # TRL's index -1 is wrong here


def test_save_and_reload_policy_folder(trl_model, inputs, reward_dir_trl, tmp_path):
    m = trl_model
    m.set_adapter("policy_1")
    with torch.no_grad():
        want = m(**inputs)
    m.save_pretrained(tmp_path / "p1")
    again = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(tmp_path / "p1"), reward_adapter=str(reward_dir_trl), quantization_config="8bit")
    assert again.active == "default"
    with torch.no_grad():
        got = again(**inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
