"""Every architecture of `marl_ray.data.tiny.ARCHITECTURES` on every base precision: loading, the
default LoRA targets, a training step, isolation, and our log-probs against HF's own forward.

Tiny random models (H=64, 2 layers) of each family's layout, built locally and seeded: Llama,
Qwen2 (q/k/v bias), Qwen3 (q/k norm, tied), Mistral (sliding window), Gemma 2 (scaled and tied
embeddings, soft-capped attention and logits), Gemma 3 (q/k norm), Phi-3 (fused qkv_proj and
gate_up_proj) and GPT-2 (Conv1D, n_embd). Precisions: fp32, bf16, 8-bit and 4-bit (bitsandbytes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import TEXTS, pad_batch, quiet_from_pretrained, randomize_, randomize_policy_
from isolation_utils import check_training_a_isolates
from marl_ray.data.tiny import ARCHITECTURES
from marl_ray.model import AdapterError, MultiAdapterModel
from marl_ray.model import targets as tg
from marl_ray.algorithms.ppo import logprobs_from_logits

PRECISIONS = {"fp32": ("none", "fp32"), "bf16": ("none", "bf16"), "8bit": ("8bit", "fp32"), "4bit": ("4bit", "fp32")}

# What the default (null) policy targets wrap, and every linear layer (all-linear), per architecture.
QV = {a: ["q_proj", "v_proj"] for a in ARCHITECTURES} | {"phi3": ["qkv_proj"], "gpt2": ["c_attn"]}
LINEAR = {a: ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] for a in ARCHITECTURES}
LINEAR |= {"phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], "gpt2": ["c_attn", "c_fc", "c_proj"]}


def _lora(targets=None, r: int = 4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)


@pytest.fixture(scope="session")
def arch_assets(tmp_path_factory):
    """arch -> {"base": folder, "reward": reward adapter folder}, each built on first use."""
    from marl_ray.data.tiny import build_tiny

    cache: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"arch_{arch}")
            base = build_tiny(root / "base", texts=TEXTS, arch=arch, seed=0)
            cache[arch] = {"base": base, "reward": write_reward(base, root / "reward", seed=7)}
        return cache[arch]

    return get


def write_reward(base: Path, folder: Path, seed: int) -> Path:
    """A reward adapter as the reward stage writes it (TRL's SEQ_CLS format, the stage's default targets:
    all-linear), with seeded non-zero LoRA B weights and score head, and marl_ray.json."""
    import json

    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_ray.model.adapter_io import META_FILE, base_fingerprint
    from marl_ray.stages.common import lora_config
    from marl_ray.stages.reward import RewardLoraSpec

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(base), num_labels=1)
        seq.config.pad_token_id = 0
        pm = get_peft_model(seq, lora_config(RewardLoraSpec(r=4, alpha=8), "SEQ_CLS", seq))
    randomize_([p for n, p in pm.named_parameters() if ".lora_B." in n], seed)
    randomize_([p for n, p in pm.named_parameters() if "score" in n and "modules_to_save" in n], seed + 1, std=0.5)
    pm.save_pretrained(str(folder))
    (folder / META_FILE).write_text(json.dumps({"role": "reward", "base_fingerprint": base_fingerprint(seq)}))
    return folder


def batch(base: Path):
    """Left-padded prompt + 4 response tokens (3 rows): (ids, mask, response_start)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    texts = ["the movie was great and i loved it", "a terrible film with bad acting",
             "what a wonderful performance by the whole cast"]
    ids, mask = pad_batch([tok(t)["input_ids"] for t in texts], tok.pad_token_id, "left")
    assert (mask[:, 0] == 0).any()
    return ids, mask, ids.shape[1] - 4


def load(arch_assets, arch: str, precision: str) -> MultiAdapterModel:
    quantization, dtype = PRECISIONS[precision]
    return MultiAdapterModel.from_pretrained(str(arch_assets(arch)["base"]), quantization=quantization, dtype=dtype)


def hf_logprobs(m: MultiAdapterModel, names, ids, mask, rs) -> torch.Tensor:
    """Token logprobs from HF's own forward of the (peft-wrapped) causal LM: its logits, log-softmax."""
    with m.route(names), torch.no_grad():
        logits = m.base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logprobs_from_logits(logits[:, rs - 1:-1].float(), ids[:, rs:])


ARCH_X_PRECISION = [(a, p) for a in ARCHITECTURES for p in PRECISIONS]


# ------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("arch,precision", ARCH_X_PRECISION)
def test_logprobs_match_hf_forward(arch_assets, arch, precision):
    """Our passes (final hidden states + our LM head, Gemma 2's logit soft-cap included) give the log-probs of
    HF's own forward: the policy's, the reference's (adapters off) and, in one mixed pass, both again."""
    m = load(arch_assets, arch, precision)
    ids, mask, rs = batch(arch_assets(arch)["base"])
    m.add_policy("b", _lora(), seed=2)
    randomize_policy_(m, "b", seed=3)
    m.add_reward("rm", arch_assets(arch)["reward"])
    want_b = hf_logprobs(m, ["b"] * 3, ids, mask, rs)
    want_ref = hf_logprobs(m, ["__base__"] * 3, ids, mask, rs)
    assert (want_b - want_ref).abs().max() > 1e-2, "policy b should not be a no-op"
    # the same batch, the same kernels: exact but for Llama's lean passes (bf16 rounding there)
    tol = 1e-2 if precision == "bf16" else 1e-5
    with torch.no_grad():
        got_b = m.policy_forward("b", ids, mask, rs)[0]
    torch.testing.assert_close(got_b, want_b, atol=tol, rtol=0)
    torch.testing.assert_close(m.reference_logprobs(ids, mask, rs), want_ref, atol=tol, rtol=0)
    ev = m.evaluate(ids, mask, ["b"] * 3, ["rm"] * 3, rs)  # a mixed batch of 9 rows under 3 adapters
    mixed_tol = 1e-5 if precision == "fp32" else 5e-2
    torch.testing.assert_close(ev.logprobs_BR, want_b, atol=mixed_tol, rtol=0)
    torch.testing.assert_close(ev.ref_logprobs_BR, want_ref, atol=mixed_tol, rtol=0)
    assert torch.isfinite(ev.scores_B).all() and ev.scores_B.std() > 1e-3
    if m.logit_softcap and precision == "fp32":  # Gemma 2: without the cap our log-probs would be off
        h = m.hidden(ids, mask, "b", keep_from=rs - 1)[:, :-1]
        raw = logprobs_from_logits(m.base.get_output_embeddings()(h).float(), ids[:, rs:])
        assert (raw - want_b).abs().max() > 1e-3  # 100x the tolerance above


# ------------------------------------------------------------------------------------ isolation
@pytest.mark.parametrize("arch,precision", ARCH_X_PRECISION)
def test_training_one_policy_changes_nothing_else(arch_assets, arch, precision):
    """Training policy a (3 AdamW steps, the default targets, gradient checkpointing on 4/8-bit bases) leaves
    the base (weights, buffers, quantization state), the reward adapter and score head, the reference and
    policy b bit for bit as they were; a changes; only policies' tensors ever require grad."""
    m = load(arch_assets, arch, precision)
    ids, mask, rs = batch(arch_assets(arch)["base"])
    m.add_policy("a", _lora(), seed=1)
    m.add_policy("b", _lora("all-linear"), seed=2)
    randomize_policy_(m, "b", seed=3)
    m.add_reward("rm", arch_assets(arch)["reward"])
    assert m.value_heads["a"].in_features == m.base.config.get_text_config().hidden_size == 64  # GPT-2: n_embd
    check_training_a_isolates(m, ids, mask, rs, quantized=precision in ("8bit", "4bit"))


# ------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_and_all_linear(arch_assets, arch):
    """null = the query and value projections of each architecture; all-linear = every linear layer but
    the output head; the reward stage's default (all-linear) on the sequence classifier leaves out the
    score head; each layer's LoRA sees the right widths (GPT-2's Conv1D: fan_in_fan_out)."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_ray.stages.common import lora_config
    from marl_ray.stages.reward import RewardLoraSpec

    m = load(arch_assets, arch, "fp32")
    assert tg.linear_names(m.base) == LINEAR[arch]
    m.add_policy("qv", _lora(), seed=0)
    m.add_policy("all", _lora("all-linear"), seed=0)
    m.add_policy("one", _lora([LINEAR[arch][0]]), seed=0)
    wrapped = lambda name: sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1]  # noqa: E731
                                   for k in m.policy_state(name) if ".lora_A." in k})
    assert wrapped("qv") == QV[arch] and wrapped("all") == LINEAR[arch] and wrapped("one") == [LINEAR[arch][0]]
    assert tg.linear_names(m.base) == LINEAR[arch]  # the LoRA wrappers are not listed as layers
    assert m.peft.peft_config["qv"].fan_in_fan_out == (arch == "gpt2")
    n_layers = m.base.config.get_text_config().num_hidden_layers
    from marl_ray.model.passes import decoder_layers

    assert len(decoder_layers(m.base.get_decoder())) == n_layers  # what gradient checkpointing wraps

    seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(arch_assets(arch)["base"]), num_labels=1)
    pm = get_peft_model(seq, lora_config(RewardLoraSpec(), "SEQ_CLS", seq))
    lora_leaves = sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in pm.named_parameters() if ".lora_A." in n})
    assert lora_leaves == LINEAR[arch]


def test_reward_default_on_llama_is_the_old_explicit_list_bit_for_bit(arch_assets):
    """The reward stage's default was Llama's seven projections by name; all-linear wraps the same layers in
    the same order, so the same seed gives the same adapter (the demo's reward stage is unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_ray.stages.common import lora_config
    from marl_ray.stages.reward import RewardLoraSpec

    states = []
    for cfg in (lambda seq: lora_config(RewardLoraSpec(), "SEQ_CLS", seq),
                lambda seq: LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
                    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(arch_assets("llama")["base"]),
                                        num_labels=1)
            pm = get_peft_model(seq, cfg(seq))
            states.append({n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad})
            states[-1]["next_random"] = torch.rand(3)
    assert states[0].keys() == states[1].keys() and len(states[0]) == 2 * 7 * 2 + 1 + 1  # + score head, rand
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_a_target_that_matches_nothing_names_the_base_layers(arch_assets, arch):
    m = load(arch_assets, arch, "fp32")
    for targets in (["q_proj", "v_proj", "nope"], ["nope"]):
        if arch != "llama" and targets[0] == "q_proj":
            targets = ["q_proj", "v_proj"]  # Llama names on a Phi-3 / GPT-2 base: the case
        with pytest.raises(AdapterError) as e:
            m.add_policy("p", _lora(targets))
        msg = str(e.value)
        missing = [t for t in targets if t not in LINEAR[arch]]
        assert all(repr(t) in msg for t in missing) and "match" in msg and "no module of this base" in msg, msg
        assert f"its linear layers are named {', '.join(LINEAR[arch])}" in msg, msg
        assert m.roles == {} and m.peft is None  # nothing was added
    m.add_policy("p", _lora(["self_attn.o_proj"] if arch != "gpt2" else ["attn.c_proj"]))  # dotted suffixes match
    with pytest.raises(AdapterError, match=r"'embed' matches no module"):
        m.add_policy("q", _lora(["embed"]))
    assert m.policies == ["p"]


def test_target_modules_in_the_config():
    from marl_ray.config import ConfigError, LoraSpec, load_config
    from marl_ray.config.schema import PolicySpec

    def lora(value):
        return load_config(PolicySpec, base={"name": "a", "reward": "rm", "lora": {"target_modules": value}}).lora

    assert lora(None).target_modules is None and LoraSpec().target_modules is None
    assert lora("all-linear").target_modules == ("all-linear",) and lora("c_attn").target_modules == ("c_attn",)
    assert lora(["q_proj", "k_proj"]).target_modules == ("q_proj", "k_proj")
    with pytest.raises(ConfigError, match="all-linear already names every linear layer"):
        lora(["all-linear", "q_proj"])


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_generate_fallback_says_so_once(arch_assets, arch, caplog):
    """The lean decode loop serves Llama, Qwen2, Qwen3 and Mistral (decoding.FAMILIES): every other base
    samples with HF generate, and one log line says so (a warning, when the model is made: a model host's INFO
    records reach no console on Ray); sampling itself logs nothing more."""
    from marl_ray.model import decoding

    base = str(arch_assets(arch)["base"])
    with caplog.at_level(logging.INFO, logger="marl_ray"):
        m = MultiAdapterModel.from_pretrained(base)
        m.add_policy("a", _lora(), seed=1)
        m.add_policy("b", _lora(), seed=2)
        randomize_policy_(m, "b", seed=3)
        ids, mask, _ = batch(arch_assets(arch)["base"])
        for _ in range(2):
            torch.manual_seed(0)
            out, scores = m.generate_scored(ids, mask, ["a", "b", "a"], max_new_tokens=3)
    lines = [r.getMessage() for r in caplog.records if "HF generate" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "HF generate" in r.getMessage())
    served = arch in decoding.FAMILIES
    assert decoding.supports(m.base) == served
    assert m.sampler.name == ("lean" if served else "hf")
    if served:
        assert lines == [] and scores is not None
    else:
        assert len(lines) == 1 and type(m.base).__name__ in lines[0] and "lean decode loop" in lines[0], lines
        assert scores is None  # HF generate gives no decode-step scores: PPO scores rollouts by a pass
    assert out.shape == (3, ids.shape[1] + 3) and torch.equal(out[:, :ids.shape[1]], ids)
