"""MultiAdapterModel: adapter isolation, reference = base, reward scoring, bad input, save/load.

All on the tiny local Llama (H=64, 2 layers), CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (
    lora_config, pad_batch, quiet_from_pretrained, randomize_policy_, write_reward_folder,
)
from isolation_utils import assert_frozen_except_policies, check_training_a_isolates
from marl_ray.model.adapter_io import META_FILE, AdapterError, base_fingerprint
from marl_ray.model import MultiAdapterModel
from marl_ray.algorithms.ppo import entropy_from_logits, logprobs_from_logits


def positions(mask_BT):
    """Position ids that skip left padding (as generate uses them), computed here, independently."""
    return (mask_BT.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits_BTV, ids_BT, response_start):
    return logprobs_from_logits(logits_BTV[:, response_start - 1:-1], ids_BT[:, response_start:])


def plain_causal_lm(base_dir):
    from transformers import AutoModelForCausalLM

    return quiet_from_pretrained(AutoModelForCausalLM, str(base_dir)).eval()


def two_policies_and_reward(base_dir, reward_dir, quantization="none"):
    m = MultiAdapterModel.from_pretrained(str(base_dir), quantization=quantization)
    m.add_policy("a", lora_config(), seed=1)
    m.add_policy("b", lora_config(), seed=2)
    randomize_policy_(m, "b", seed=3)
    m.add_reward("rm", reward_dir)
    return m


# ---------------------------------------------------------------------------- 1. isolation
@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_training_one_policy_changes_nothing_else(base_dir, reward_dir, rollout, quantization):
    m = two_policies_and_reward(base_dir, reward_dir, quantization)
    ids, mask, rs = rollout
    if quantization != "none":
        raw = {p.dtype for n, p in m.base.named_parameters() if n.endswith("q_proj.base_layer.weight")}
        assert raw == ({torch.uint8} if quantization == "4bit" else {torch.int8})
    check_training_a_isolates(m, ids, mask, rs, quantized=quantization != "none")


# ---------------------------------------------------------------------------- 3. reference = base
def test_reference_is_the_plain_base(base_dir, reward_dir, rollout):
    ids, mask, rs = rollout
    assert (mask[:, 0] == 0).any(), "the batch should be left-padded"
    plain = plain_causal_lm(base_dir)
    with torch.no_grad():
        want = token_logprobs(plain(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits, ids, rs)

    bare = MultiAdapterModel.from_pretrained(str(base_dir))  # no adapter at all
    torch.testing.assert_close(bare.reference_logprobs(ids, mask, rs), want, atol=1e-5, rtol=0)

    m = two_policies_and_reward(base_dir, reward_dir)  # adapters loaded, reference = adapters disabled
    torch.testing.assert_close(m.reference_logprobs(ids, mask, rs), want, atol=1e-5, rtol=0)
    ev = m.evaluate(ids, mask, ["a", "b", "b"], ["rm"] * 3, rs)
    torch.testing.assert_close(ev.ref_logprobs_BR, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # policy b is not a no-op, so the comparison above has teeth
        assert (m.policy_forward("b", ids, mask, rs)[0] - want).abs().max() > 1e-3


def test_reference_adapter_is_base_plus_that_adapter(base_dir, reward_dir, ref_adapter_dir, rollout):
    from peft import PeftModel

    ids, mask, rs = rollout
    plain = PeftModel.from_pretrained(plain_causal_lm(base_dir), str(ref_adapter_dir)).eval()
    with torch.no_grad():
        want = token_logprobs(plain(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits, ids, rs)
        with plain.disable_adapter():
            base_lp = token_logprobs(plain(input_ids=ids, attention_mask=mask,
                                           position_ids=positions(mask)).logits, ids, rs)
    assert (want - base_lp).abs().max() > 1e-3, "the reference adapter should not be a no-op"

    m = two_policies_and_reward(base_dir, reward_dir)
    m.set_reference_adapter(ref_adapter_dir)
    assert m.roles["ref"] == "reference"
    torch.testing.assert_close(m.reference_logprobs(ids, mask, rs), want, atol=1e-5, rtol=0)
    ev = m.evaluate(ids, mask, ["a", "b", "a"], ["rm"] * 3, rs)
    torch.testing.assert_close(ev.ref_logprobs_BR, want, atol=1e-5, rtol=0)
    assert_frozen_except_policies(m)

    m2 = MultiAdapterModel.from_pretrained(str(base_dir), reference_adapter=str(ref_adapter_dir))
    torch.testing.assert_close(m2.reference_logprobs(ids, mask, rs), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- 4. padding / evaluate
def test_reward_scores_are_padding_invariant(base_dir, reward_dir, tokenizer, sentences):
    from marl_ray import AutoModelForCausalLMWithValueHead

    m = two_policies_and_reward(base_dir, reward_dir)
    trl = AutoModelForCausalLMWithValueHead.from_pretrained(str(base_dir), peft_config=lora_config(),
                                                            reward_adapter=str(reward_dir))
    pad = tokenizer.pad_token_id
    for score in (lambda i, a: m.reward_scores("rm", i, a), trl.reward_scores):
        one_by_one = torch.cat([score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                                for s in sentences])
        assert one_by_one.shape == (len(sentences),) and one_by_one.std() > 1e-3
        for side in ("right", "left"):
            ids, mask = pad_batch(sentences, pad, side)
            assert (mask == 0).any()
            torch.testing.assert_close(score(ids, mask), one_by_one, atol=1e-5, rtol=0, msg=side)
    torch.testing.assert_close(trl.reward_scores(*pad_batch(sentences, pad, "right")),
                               m.reward_scores("rm", *pad_batch(sentences, pad, "right")), atol=1e-5, rtol=0)


def test_evaluate_equals_separate_passes(base_dir, reward_dir, reward_dir_trl, rollout):
    m = two_policies_and_reward(base_dir, reward_dir)
    m.add_reward("rm2", reward_dir_trl)
    ids, mask, rs = rollout
    policies, rewards = ["a", "b", "b"], ["rm", "rm2", "rm"]
    ev = m.evaluate(ids, mask, policies, rewards, rs)
    R = ids.shape[1] - rs
    assert ev.logprobs_BR.shape == ev.values_BR.shape == ev.ref_logprobs_BR.shape == (3, R)
    assert ev.scores_B.shape == (3,)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(policies, rewards)):
            row = slice(i, i + 1)
            lp, v, logits = m.policy_forward(p, ids[row], mask[row], rs)
            torch.testing.assert_close(ev.logprobs_BR[row], lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ev.values_BR[row], v, atol=1e-5, rtol=0)
            torch.testing.assert_close(ev.entropy_BR[row], entropy_from_logits(logits), atol=1e-5, rtol=0)
            torch.testing.assert_close(ev.scores_B[row], m.reward_scores(r, ids[row], mask[row]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ev.ref_logprobs_BR, m.reference_logprobs(ids, mask, rs), atol=1e-5, rtol=0)
    # the adapters really differ, so the row-by-row equalities above have teeth
    assert (m.reward_scores("rm", ids, mask) - m.reward_scores("rm2", ids, mask)).abs().max() > 1e-3
    with torch.no_grad():
        assert (m.policy_forward("a", ids, mask, rs)[0] - m.policy_forward("b", ids, mask, rs)[0]).abs().max() > 1e-3
    assert_frozen_except_policies(m)


# ---------------------------------------------------------------------------- 5. TRL reward format
def test_trl_reward_adapter_scores_like_peft_seq_cls(base_dir, reward_dir_trl, sentences):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(base_dir), num_labels=1)
    ref = PeftModel.from_pretrained(seq, str(reward_dir_trl)).eval()
    m = MultiAdapterModel.from_pretrained(str(base_dir))
    m.add_reward("rm", reward_dir_trl)
    with torch.no_grad():
        want = torch.cat([ref(input_ids=torch.tensor([s])).logits[:, 0] for s in sentences])
    got = torch.cat([m.reward_scores("rm", torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                     for s in sentences])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.std() > 1e-3
    with torch.no_grad(), ref.disable_adapter():  # the LoRA part matters, not only the score head
        head_only = torch.cat([ref(input_ids=torch.tensor([s])).logits[:, 0] for s in sentences])
    assert (head_only - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------- 6. bad input
def model_state(m):
    return (dict(m.roles), sorted(m.peft.peft_config) if m.peft is not None else [],
            sum(p.numel() for p in m.parameters()), len(list(m.parameters())),
            sorted(m.value_heads), sorted(m.score_heads))


@pytest.fixture
def loaded(base_dir, reward_dir):
    return two_policies_and_reward(base_dir, reward_dir)


@pytest.fixture(scope="module")
def foreign_reward_dir(other_base_dir, tmp_path_factory):
    """A TRL reward folder trained on another base of the same shape, with its fingerprint recorded."""
    return write_reward_folder(other_base_dir, tmp_path_factory.mktemp("foreign") / "rm", seed=2,
                               fingerprint_meta=True)


@pytest.fixture(scope="module")
def wide_reward_dir(wide_base_dir, tmp_path_factory):
    """A TRL reward folder trained on a base with hidden size 96, no metadata."""
    return write_reward_folder(wide_base_dir, tmp_path_factory.mktemp("wide") / "rm", seed=2)


def expect_error(m, fn, *patterns, exc=AdapterError):
    before = model_state(m)
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in error message {msg!r}"
    assert model_state(m) == before, "a failed call changed the model"
    return msg


def test_reward_from_another_base_is_refused(loaded, foreign_reward_dir, other_base_dir, base_dir, rollout):
    other = plain_causal_lm(other_base_dir)
    meta = json.loads((foreign_reward_dir / META_FILE).read_text())
    assert meta["base_fingerprint"] == base_fingerprint(other) != loaded.fingerprint
    assert loaded.fingerprint == base_fingerprint(plain_causal_lm(base_dir))
    ids, mask, rs = rollout
    with torch.no_grad():
        out0 = loaded.policy_forward("b", ids, mask, rs)[0]
    expect_error(loaded, lambda: loaded.add_reward("rm2", foreign_reward_dir), "different base",
                 meta["base_fingerprint"], loaded.fingerprint)
    with torch.no_grad():
        assert torch.equal(loaded.policy_forward("b", ids, mask, rs)[0], out0)


def test_reward_with_another_hidden_size_is_refused(loaded, wide_reward_dir, tmp_path):
    assert not (wide_reward_dir / META_FILE).exists()
    # its adapter_config.json names the wide base's folder: refused by fingerprint, before any shape is read
    expect_error(loaded, lambda: loaded.add_reward("rm2", wide_reward_dir), "trained on the base", "wide")
    # named as a hub id instead (no folder to compare): the shapes give it away
    unnamed = _named_base(wide_reward_dir, tmp_path / "unnamed", "some-org/wide")
    expect_error(loaded, lambda: loaded.add_reward("rm2", unnamed), "shape", "another base")
    # Score head of the right width but LoRA weights of the wrong shape: fails after the LoRA
    # layers were injected, which must be rolled back.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "lora_mismatch"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((Path(unnamed) / "adapter_config.json").read_text())
    state = load_file(str(wide_reward_dir / "adapter_model.safetensors"))
    state = {k: (torch.zeros(1, 64) if k.endswith("score.weight") else v) for k, v in state.items()}
    save_file(state, str(bad / "adapter_model.safetensors"))
    expect_error(loaded, lambda: loaded.add_reward("rm2", bad), "shape", "another base")
    assert "rm2" not in loaded.peft.peft_config


def test_policy_folder_is_not_a_reward(loaded, tmp_path):
    loaded.save_policy("b", tmp_path / "pol")
    expect_error(loaded, lambda: loaded.add_reward("rm2", tmp_path / "pol"), "no score head", "policy adapter")


def test_missing_and_half_written_folders(loaded, reward_dir, tmp_path):
    missing = tmp_path / "does_not_exist"
    expect_error(loaded, lambda: loaded.add_reward("rm2", missing), "does not exist", str(missing))
    expect_error(loaded, lambda: loaded.load_policy("c", missing), "does not exist")
    expect_error(loaded, lambda: loaded.set_reference_adapter(missing), "does not exist")

    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((reward_dir / "adapter_config.json").read_text())
    expect_error(loaded, lambda: loaded.add_reward("rm2", half), "adapter_model.safetensors", "incomplete")
    expect_error(loaded, lambda: loaded.load_policy("c", half), "incomplete")

    (half / "adapter_model.safetensors").write_bytes(b"\x00\x01truncated")
    expect_error(loaded, lambda: loaded.add_reward("rm2", half), "cannot be read", "half-written")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    expect_error(loaded, lambda: loaded.add_reward("rm2", no_config), "adapter_config.json")

    # all weights there but some LoRA tensors missing: injected, then rolled back
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((reward_dir / "adapter_config.json").read_text())
    state = load_file(str(reward_dir / "adapter_model.safetensors"))
    dropped = next(k for k in state if "lora_A" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(partial / "adapter_model.safetensors"))
    expect_error(loaded, lambda: loaded.add_reward("rm2", partial), "missing", "incomplete")


def test_colliding_names_are_refused(loaded, reward_dir, ref_adapter_dir, tmp_path):
    expect_error(loaded, lambda: loaded.add_policy("rm", lora_config()), "'rm'", "already used by a reward")
    expect_error(loaded, lambda: loaded.add_policy("a", lora_config()), "'a'", "already used by a policy")
    expect_error(loaded, lambda: loaded.add_reward("b", reward_dir), "'b'", "already used by a policy")
    expect_error(loaded, lambda: loaded.add_policy("ref", lora_config()), "'ref'", "reserved")
    expect_error(loaded, lambda: loaded.add_reward("ref", reward_dir), "'ref'", "reserved")
    loaded.save_policy("b", tmp_path / "b")
    expect_error(loaded, lambda: loaded.load_policy("rm", tmp_path / "b"), "already used by a reward")
    expect_error(loaded, lambda: loaded.add_policy("__base__", lora_config()), "not allowed")
    loaded.set_reference_adapter(ref_adapter_dir)
    expect_error(loaded, lambda: loaded.set_reference_adapter(ref_adapter_dir), "'ref'", "already used")


def test_first_adapter_failing_leaves_a_usable_model(base_dir, reward_dir, tmp_path, rollout):
    """The rollback also works when the failing adapter would have been the first one."""
    from safetensors.torch import load_file, save_file

    m = MultiAdapterModel.from_pretrained(str(base_dir))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((reward_dir / "adapter_config.json").read_text())
    state = load_file(str(reward_dir / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if "lora_B" not in k}, str(partial / "adapter_model.safetensors"))
    n0 = sum(p.numel() for p in m.parameters())
    with pytest.raises(AdapterError, match="missing"):
        m.add_reward("rm", partial)
    assert m.roles == {} and sum(p.numel() for p in m.parameters()) == n0
    m.add_reward("rm", reward_dir)
    m.add_policy("a", lora_config())
    ids, mask, rs = rollout
    assert m.reward_scores("rm", ids, mask).isfinite().all()
    assert_frozen_except_policies(m)


@pytest.mark.parametrize("quantization,pattern", [
    ("3bit", "'3bit' is not one of"),
    ("nf3", "bnb_4bit_quant_type 'nf3' cannot be served"),
    ("neither", "neither load_in_4bit nor load_in_8bit"),
])
def test_unservable_quantization_is_refused(base_dir, quantization, pattern):
    from transformers import BitsAndBytesConfig

    q = {"nf3": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf3"),
         "neither": BitsAndBytesConfig()}.get(quantization, quantization)
    with pytest.raises(ValueError) as info:
        MultiAdapterModel.from_pretrained(str(base_dir), quantization=q)
    assert pattern in str(info.value)


# ---------------------------------------------------------------------------- 7. save / load
def test_save_load_round_trip(base_dir, reward_dir, rollout, tmp_path):
    from peft import PeftModel

    ids, mask, rs = rollout
    m = two_policies_and_reward(base_dir, reward_dir)
    folder = tmp_path / "policy_b"
    m.save_policy("b", folder)
    assert json.loads((folder / META_FILE).read_text())["base_fingerprint"] == m.fingerprint
    with torch.no_grad():
        want = m.policy_forward("b", ids, mask, rs)

    fresh = MultiAdapterModel.from_pretrained(str(base_dir))
    fresh.add_reward("rm", reward_dir)
    fresh.load_policy("restored", folder)
    assert fresh.policies == ["restored"]
    with torch.no_grad():
        got = fresh.policy_forward("restored", ids, mask, rs)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    restored = fresh.policy_state("restored")
    saved = {k.replace(".b.", ".restored."): v for k, v in m.policy_state("b").items()}
    assert saved.keys() == restored.keys()
    for k, v in saved.items():
        assert torch.equal(v, restored[k]), k
    assert_frozen_except_policies(fresh)

    # plain peft loads the folder and gives the policy's logits
    plain = PeftModel.from_pretrained(plain_causal_lm(base_dir), str(folder)).eval()
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(logits[:, rs - 1:-1], want[2], atol=1e-5, rtol=0)

    # overwriting a saved folder is atomic and leaves no temp folders behind
    m.save_policy("a", folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy_b"]


def _named_base(src, dst, base_name) -> str:
    """A copy of the TRL-format reward folder `src` whose adapter_config.json names `base_name`."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_name)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_a_trl_adapter_names_its_base_and_another_base_is_refused(base_dir, other_base_dir, reward_dir_trl, tmp_path,
                                                                  caplog):
    """Without marl_ray.json, adapter_config.json's base_model_name_or_path is checked: a local folder
    with other weights is refused with both paths named; the same weights under another path load;
    a name that is not a local folder loads with a warning naming both."""
    import logging
    import shutil

    from marl_ray.model import MultiAdapterModel
    from marl_ray.model.adapter_io import AdapterError, base_fingerprint, folder_fingerprint

    model = MultiAdapterModel.from_pretrained(str(base_dir))
    assert folder_fingerprint(base_dir) == model.fingerprint == base_fingerprint(model.base)
    assert folder_fingerprint(other_base_dir) not in (None, model.fingerprint)
    other = _named_base(reward_dir_trl, tmp_path / "other", other_base_dir)
    with pytest.raises(AdapterError, match="trained on the base") as e:
        model.add_reward("rm_other", other)
    assert str(other_base_dir) in str(e.value) and str(base_dir) in str(e.value)
    assert "rm_other" not in model.roles
    copy = tmp_path / "base_copy"
    shutil.copytree(base_dir, copy)
    model.add_reward("rm_copy", _named_base(reward_dir_trl, tmp_path / "copy", copy))
    with caplog.at_level(logging.WARNING):
        model.add_reward("rm_hub", _named_base(reward_dir_trl, tmp_path / "hub", "some-org/some-model"))
    assert "some-org/some-model" in caplog.text and str(base_dir) in caplog.text
