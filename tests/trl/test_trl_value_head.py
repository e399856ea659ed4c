"""TRL 0.11.4's value-head and peft model tests, restated for marl_ray's drop-in (no TRL code).

Each test names the TRL 0.11.4 test whose behaviour it restates (tests/test_modeling_value_head.py
"VH", tests/test_peft_models.py "PEFT"), on the tiny local Llama instead of hub models. The list
and the tally are in docs/trl_dropin.md.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import lora_config, quiet_from_pretrained

from marl_ray import AutoModelForCausalLMWithValueHead as VHModel

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
H = 64  # the tiny base's hidden size: a value head has H + 1 weights


def causal_lm(base_dir, **kw):
    from transformers import AutoModelForCausalLM

    return quiet_from_pretrained(AutoModelForCausalLM, str(base_dir), **kw)


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def n_lora(peft_model, adapter="default") -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if f".{adapter}." in n and "lora_" in n)


@pytest.fixture(scope="module")
def full(base_dir):
    return VHModel.from_pretrained(str(base_dir))


# ---------------------------------------------------------------------------- the full value-head model
def test_full_model_has_a_one_output_value_head_with_random_bias(full):
    """VH test_value_head, test_value_head_shape, test_value_head_init_random."""
    assert not full.is_peft_model
    assert full.v_head.summary.weight.shape == (1, H)
    assert full.v_head.summary.bias.abs().max() > 0  # nn.Linear's random init, not zeros


def test_model_instance_gets_a_value_head(base_dir):
    """VH test_value_head_not_str."""
    model = VHModel.from_pretrained(causal_lm(base_dir))
    assert model.v_head.summary.weight.shape == (1, H) and not model.is_peft_model


def test_forward_returns_logits_loss_value(full, tokenizer):
    """VH test_inference (three outputs); the loss with `labels` (used by TRL's reference-model test)."""
    out = full(IDS)
    assert len(out) == 3
    logits, loss, value = out
    assert logits.shape == (1, IDS.shape[1], len(tokenizer)) and logits.dtype == torch.float32
    assert loss is None and value.shape == IDS.shape
    _, loss, _ = full(input_ids=IDS, labels=IDS)
    want = torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)


def test_return_past_key_values_continues_the_sequence(full):
    """VH forward's `return_past_key_values`: a fourth output, a cache that continues the pass."""
    full.eval()
    with torch.no_grad():
        logits, _, value = full(IDS)
        out = full(IDS[:, :-1], return_past_key_values=True)
        assert len(out) == 4 and out[3] is not None
        step = full(IDS[:, -1:], past_key_values=out[3])
    torch.testing.assert_close(step[0][:, -1], logits[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[2][:, -1], value[:, -1], atol=1e-5, rtol=0)


def test_summary_dropout_from_config_and_kwargs(base_dir):
    """VH test_dropout_config (the model config's summary_dropout_prob wins) and test_dropout_kwargs."""
    lm = causal_lm(base_dir)
    lm.config.summary_dropout_prob = 0.5
    assert VHModel.from_pretrained(lm, summary_dropout_prob=0.2).v_head.dropout.p == 0.5
    for kwargs in ({"summary_dropout_prob": 0.5}, {"summary_dropout_prob": 0.3, "peft_config": lora_config()}):
        assert VHModel.from_pretrained(str(base_dir), **kwargs).v_head.dropout.p == kwargs["summary_dropout_prob"]
    assert VHModel.from_pretrained(causal_lm(base_dir)).v_head.dropout.p == 0.1  # TRL's default
    assert isinstance(VHModel.from_pretrained(causal_lm(base_dir), summary_dropout_prob=0).v_head.dropout,
                      torch.nn.Identity)


def test_v_head_init_strategy_normal(base_dir):
    """The class's documented `v_head_init_strategy="normal"` with `v_head_initializer_range`:
    normal(0, range) weights and a zero bias, for the full and the peft model."""
    for kwargs in ({}, {"peft_config": lora_config()}):
        model = VHModel.from_pretrained(causal_lm(base_dir), v_head_init_strategy="normal",
                                        v_head_initializer_range=2.0, **kwargs)
        w, b = model.v_head.summary.weight, model.v_head.summary.bias
        assert torch.equal(b, torch.zeros_like(b)) and 1.2 < w.std() < 3.0
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        VHModel.from_pretrained(causal_lm(base_dir), v_head_init_strategy="xavier")


def test_generate(full):
    """VH test_generate."""
    out = full.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3) and torch.equal(out[:, :IDS.shape[1]], IDS)


def test_model_without_lm_head_is_refused(base_dir):
    """VH test_raise_error_not_causallm."""
    with pytest.raises(ValueError, match="language model head"):
        VHModel.from_pretrained(causal_lm(base_dir).model)


def test_bf16_kwargs(base_dir):
    """VH test_transformers_bf16_kwargs: torch_dtype reaches the base; a forward pass runs."""
    model = VHModel.from_pretrained(str(base_dir), torch_dtype=torch.bfloat16)
    assert model.pretrained_model.lm_head.weight.dtype == torch.bfloat16
    logits, _, value = model(torch.LongTensor([[0, 1, 0, 1]]))
    assert logits.dtype == torch.float32 and value.isfinite().all()


def test_full_model_trains(base_dir):
    """VH ReferenceModelTest (the model half): the loss from `labels` backpropagates into the base's
    weights and an optimizer step changes them."""
    model = VHModel.from_pretrained(str(base_dir))
    assert n_trainable(model) == sum(p.numel() for p in model.pretrained_model.parameters()) + H + 1
    layer = "pretrained_model.model.layers.1.self_attn.q_proj.weight"
    before = model.get_parameter(layer).detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=IDS, labels=IDS)[1].backward()
    opt.step()
    assert not torch.equal(model.get_parameter(layer), before)


# ---------------------------------------------------------------------------- full checkpoints
def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_full_save_and_reload(full, tmp_path, shard):
    """VH test_from_save_trl and test_from_save_trl_sharded (here really sharded)."""
    full.save_pretrained(tmp_path, max_shard_size=shard) if shard else full.save_pretrained(tmp_path)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again = VHModel.from_pretrained(str(tmp_path))
    assert_same_state(again.state_dict(), full.state_dict())
    assert any(k.startswith("v_head.") for k in again.state_dict())


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_full_checkpoint_loads_in_transformers(full, base_dir, tmp_path, shard):
    """VH test_from_save_transformers and test_from_save_transformers_sharded: the folder is an
    ordinary transformers checkpoint; our state dict is the model's plus v_head.*."""
    full.save_pretrained(tmp_path, max_shard_size=shard) if shard else full.save_pretrained(tmp_path)
    parent = VHModel.transformers_parent_class
    original = quiet_from_pretrained(parent, str(base_dir)).state_dict()
    reloaded = quiet_from_pretrained(parent, str(tmp_path)).state_dict()
    assert_same_state(reloaded, original)
    ours = full.state_dict()
    assert {k for k in ours if not k.startswith("v_head.")} == set(original)
    for k in original:
        assert torch.equal(ours[k], original[k]), k


# ---------------------------------------------------------------------------- peft models
def test_peft_model_instance_is_the_policy(base_dir):
    """PEFT test_create_peft_model, test_peft_requires_grad, test_check_peft_model_nb_trainable_params."""
    from peft import get_peft_model

    peft_model = get_peft_model(causal_lm(base_dir), lora_config())
    model = VHModel.from_pretrained(peft_model)
    assert model.is_peft_model and model.pretrained_model is peft_model and model.active == "default"
    assert model.v_head.summary.weight.requires_grad
    assert n_trainable(model) == n_lora(peft_model) + H + 1
    full = VHModel.from_pretrained(str(base_dir))
    assert n_trainable(full) == sum(p.numel() for p in full.pretrained_model.parameters()) + H + 1


def test_peft_model_from_config(base_dir):
    """PEFT test_create_peft_model_from_config: from a path and from a model instance."""
    for src in (str(base_dir), causal_lm(base_dir)):
        model = VHModel.from_pretrained(src, peft_config=lora_config())
        assert model.is_peft_model and n_trainable(model) == n_lora(model.pretrained_model) + H + 1


def test_8bit_peft_model_from_config(base_dir):
    """PEFT test_create_bnb_peft_model_from_config: load_in_8bit=True, and an 8-bit model instance."""
    from bitsandbytes.nn import Linear8bitLt
    from transformers import BitsAndBytesConfig

    instance = causal_lm(base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    for model in (VHModel.from_pretrained(str(base_dir), peft_config=lora_config(), load_in_8bit=True),
                  VHModel.from_pretrained(instance, peft_config=lora_config())):
        assert model.is_loaded_in_8bit and n_trainable(model) == n_lora(model.pretrained_model) + H + 1
        assert type(model.pretrained_model.get_base_model().model.layers[0].mlp.up_proj) is Linear8bitLt
        assert model(IDS)[2].isfinite().all()


def test_peft_save_and_reload(base_dir, tmp_path):
    """PEFT test_save_pretrained_peft: peft's adapter files plus TRL's pytorch_model.bin holding the
    v_head.* weights alone; the reloaded model has the same parameters."""
    from peft import get_peft_model

    model = VHModel.from_pretrained(get_peft_model(causal_lm(base_dir), lora_config()))
    with torch.no_grad():  # LoRA B starts at zero: give it weights the round trip must carry
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    head = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert sorted(head) == ["v_head.summary.bias", "v_head.summary.weight"]
    again = VHModel.from_pretrained(str(tmp_path))
    pairs = list(zip(model.named_parameters(), again.named_parameters(), strict=True))
    for (n1, p1), (n2, p2) in pairs:
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_peft_folder_written_by_peft_loads(base_dir, tmp_path):
    """PEFT test_load_pretrained_peft and test_continue_training_peft_model: a folder peft's own
    save_pretrained wrote loads (a fresh value head), trainable with is_trainable=True."""
    from peft import get_peft_model

    peft_model = get_peft_model(causal_lm(base_dir), lora_config())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model = VHModel.from_pretrained(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    again = VHModel.from_pretrained(str(tmp_path), is_trainable=True)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n1 == n2
        if not n1.startswith("v_head."):
            assert torch.equal(p1, p2), n1
    assert n_trainable(again) == n_lora(again.pretrained_model) + H + 1


def test_trl_peft_layout_loads_its_value_head(base_dir, tmp_path):
    """TRL's peft checkpoint layout (adapter files + v_head.* in pytorch_model.bin, no files of ours)
    loads with its value head; peft_config given beside a trained folder is ignored, as in TRL."""
    from peft import get_peft_model

    peft_model = get_peft_model(causal_lm(base_dir), lora_config())
    peft_model.save_pretrained(str(tmp_path))
    head = {"v_head.summary.weight": torch.randn(1, H), "v_head.summary.bias": torch.randn(1)}
    torch.save(head, tmp_path / "pytorch_model.bin")
    model = VHModel.from_pretrained(str(tmp_path), peft_config=lora_config(r=8))
    assert_same_state(model.state_dict(), head)
    assert model.pretrained_model.peft_config["default"].r == 4


def test_checkpoint_names_and_keeps_other_files(base_dir, tmp_path):
    """save_pretrained writes into the folder like peft does: a tokenizer saved there first stays."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp_path))
    VHModel.from_pretrained(str(base_dir), peft_config=lora_config()).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file() and (tmp_path / "adapter_config.json").is_file()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["peft_type"] == "LORA"


def test_constructor_wraps_models(base_dir):
    """TRL's constructor, AutoModelForCausalLMWithValueHead(pretrained_model, **v_head_kwargs):
    a causal LM gives the full model, a PeftModel the peft one."""
    from peft import get_peft_model

    full = VHModel(causal_lm(base_dir), summary_dropout_prob=0.2)
    assert not full.is_peft_model and full.v_head.dropout.p == 0.2
    peft_model = get_peft_model(causal_lm(base_dir), lora_config())
    model = VHModel(peft_model)
    assert model.is_peft_model and model.pretrained_model is peft_model and model.active == "default"


def test_other_keyword_arguments_reach_transformers(base_dir):
    """As in TRL, from_pretrained's other keyword arguments go to transformers' from_pretrained."""
    model = VHModel.from_pretrained(str(base_dir), peft_config=lora_config(), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert model(IDS)[2].shape == IDS.shape
