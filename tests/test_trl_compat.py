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
    m.save_pretrained(tmp_path / "p1", adapter_name="policy_1")  # that policy alone, at the top
    again = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(tmp_path / "p1"), reward_adapter=str(reward_dir_trl), quantization_config="8bit")
    assert again.active == "default" and again.model.policies == ["default"]
    again.eval()  # a new model is in training mode, as in TRL: its value head's dropout is on
    with torch.no_grad():
        got = again(**inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


def test_save_and_reload_every_policy(trl_model, inputs, reward_dir_trl, tmp_path):
    """Without adapter_name: peft's layout ("default" at the top, each other policy in a subfolder
    of its name, each with its value head); loading gives back every policy under its name."""
    m = trl_model
    want = {}
    with torch.no_grad():
        for name in ("default", "policy_1"):
            m.set_adapter(name)
            want[name] = m(**inputs)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "policy_1" / "adapter_config.json").is_file()
    assert (tmp_path / "policy_1" / "pytorch_model.bin").is_file()
    again = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), reward_adapter=str(reward_dir_trl),
                                                              quantization_config="8bit")
    assert again.model.roles == {"default": "policy", "policy_1": "policy", "reward_adapter": "reward"}
    again.eval()
    for name in ("default", "policy_1"):
        again.set_adapter(name)
        with torch.no_grad():
            got = again(**inputs)
        assert torch.equal(got[0], want[name][0]) and torch.equal(got[2], want[name][2]), name


# ---------------------------------------------------------------------------- TRL 0.11.4's multi-adapter tests
def reward_model_logits(base_dir, reward_dir, ids):
    """What the reward adapter scores as the sequence-classification model it was trained as."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from conftest import quiet_from_pretrained

    seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(base_dir), num_labels=1)
    with torch.no_grad():
        return PeftModel.from_pretrained(seq, str(reward_dir)).eval()(input_ids=ids).logits


def test_peft_model_with_reward_adapter_trains_and_keeps_scores(base_dir, reward_dir_trl, tokenizer):
    """TRL test_peft_model_ppo_adapter_rm_trainer and test_peft_model_ppo_trainer (the PPO steps are
    two plain optimizer steps here, the second with gradient checkpointing): a PeftModel instance is
    the policy; the reward at the last token equals the reward model's logits before and after
    training; only the policy's LoRA and the value head get gradients (TRL's parameter names)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import quiet_from_pretrained

    ids = torch.tensor([tokenizer("the plot was slow")["input_ids"]] * 2)
    want = reward_model_logits(base_dir, reward_dir_trl, ids)
    peft_model = get_peft_model(quiet_from_pretrained(AutoModelForCausalLM, str(base_dir)), lora_config())
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model, reward_adapter=str(reward_dir_trl))
    assert model.pretrained_model is peft_model and model.supports_rm_adapter
    torch.testing.assert_close(model.compute_reward_score(ids)[:, -1, :], want, atol=1e-5, rtol=1e-5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        logits, _, values = model(input_ids=ids)
        logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
        (-logprobs.mean() + values.pow(2).mean()).backward()
        opt.step()
    torch.testing.assert_close(model.compute_reward_score(ids)[:, -1, :], want, atol=1e-5, rtol=1e-5)
    named = list(model.named_parameters())
    assert any(n.startswith("v_head.") for n, _ in named) and any(".lora_A.reward_adapter." in n for n, _ in named)
    for name, param in named:
        if ("lora" in name or "v_head" in name) and "reward" not in name:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


def test_reward_adapter_on_a_model_instance(base_dir, reward_dir_trl, tokenizer):
    """A base given as a model instance takes a reward adapter like a base given as a path."""
    from transformers import AutoModelForCausalLM

    from conftest import quiet_from_pretrained

    ids = torch.tensor([tokenizer("a movie review")["input_ids"]])
    base = quiet_from_pretrained(AutoModelForCausalLM, str(base_dir))
    m = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora_config(),
                                                          reward_adapter=str(reward_dir_trl))
    torch.testing.assert_close(m.compute_reward_score(ids)[:, -1, :],
                               reward_model_logits(base_dir, reward_dir_trl, ids), atol=1e-5, rtol=1e-5)
    assert m.score is m.model.score_heads["reward_adapter"] and m.score.bias is None


def test_refusals(base_dir, reward_dir_trl, tokenizer):
    """TRL's from_pretrained refusals: a reward adapter without peft, a reward adapter that is not a
    path, a peft_config that is not a PeftConfig; compute_reward_score without a reward adapter."""
    with pytest.raises(ValueError, match="reward_adapter can only be used with a peft model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), reward_adapter=str(reward_dir_trl))
    with pytest.raises(ValueError, match="reward_adapter should be"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config=lora_config(), reward_adapter=3)
    with pytest.raises(ValueError, match="peft_config should be"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config={"r": 4})
    m = AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config=lora_config())
    assert not m.supports_rm_adapter
    with pytest.raises(ValueError, match="no reward adapter"):
        m.compute_reward_score(torch.tensor([[1, 5, 9]]))


def test_peft_api_is_the_source_of_truth(base_dir, reward_dir_trl, inputs):
    """Adapters added, activated and deleted the peft way on `pretrained_model` are what the model
    knows: the seed document's second policy, with its own value head."""
    m = AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config=lora_config(),
                                                          reward_adapter=str(reward_dir_trl))
    m.eval()
    with torch.no_grad():
        out_default = m(**inputs)
    m.pretrained_model.add_adapter("policy_1", lora_config())
    with torch.no_grad():
        for n, p in m.pretrained_model.named_parameters():
            if ".lora_B.policy_1." in n:
                p.normal_()
    params = {id(p) for p in m.parameters()}  # an optimizer built now sees policy_1's head
    assert id(m.model.value_heads["policy_1"].weight) in params
    assert m.model.roles == {"default": "policy", "reward_adapter": "reward", "policy_1": "policy"}
    m.compute_reward_score(**inputs, ppo_adapter_name="policy_1")
    assert m.active == m.pretrained_model.active_adapter == "policy_1"
    assert m.v_head.summary is m.model.value_heads["policy_1"]
    with torch.no_grad():
        out_1 = m(**inputs)
    assert (out_1[0] - out_default[0]).abs().max() > 1e-3 and (out_1[2] - out_default[2]).abs().max() > 1e-3
    m.pretrained_model.set_adapter("default")  # peft's own switch
    assert m.active == "default"
    with torch.no_grad():
        again = m(**inputs)
    assert torch.equal(again[0], out_default[0]) and torch.equal(again[2], out_default[2])
    m.set_adapter("policy_1")  # ours moves peft's
    assert m.pretrained_model.active_adapter == "policy_1"
    m.set_adapter("default")
    # every policy stays trainable, the reward adapter never is
    lora = {n: p.requires_grad for n, p in m.named_parameters() if "lora_" in n}
    assert all(v == (".reward_adapter." not in n) for n, v in lora.items())
    m.pretrained_model.delete_adapter("policy_1")
    with pytest.raises(ValueError, match="no policy adapter named 'policy_1'"):
        m.compute_reward_score(**inputs, ppo_adapter_name="policy_1")
    assert "policy_1" not in m.model.roles and "policy_1" not in m.model.value_heads


def test_forward_leaves_the_registry_fast_path(base_dir, inputs):
    """The drop-in's forward reads the final hidden states through a hook held for the call only:
    transformers' output_hidden_states would leave hooks on the layers for good, and with them the
    registry's passes (reward scoring, evaluate) would fall back from decoding.LeanLlama."""
    from marl_ray.model import decoding

    m = AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config=lora_config()).eval()
    assert decoding.supports(m.model.base)
    logits, _, values = m(**inputs)
    assert decoding.supports(m.model.base)
    _, _, values_2 = m(**inputs, output_hidden_states=True)  # asked for: passed on, same values
    torch.testing.assert_close(values_2, values, atol=1e-6, rtol=0)
