"""Gradients through a 4-bit / 8-bit bitsandbytes base are those of its dequantized weights.

For each quantized base we build an fp32 twin whose Linear weights are the dequantized
bitsandbytes weights, give both the same LoRA policy, and compare the gradients of one loss.

Measured on CPU (torch 2.13, bitsandbytes 0.50.2, tiny Llama H=64):
- 4-bit nf4 with fp32 compute: Linear4bit dequantizes and runs F.linear in fp32, so the
  gradients are identical (max relative error 0.0). Tolerance: 1e-3.
- 8-bit (LLM.int8): in eval mode bitsandbytes casts the fp32 activations to fp16 and
  quantizes them row-wise to int8 (outlier columns above 6.0 stay fp16) before the int8
  matmul, so gradients are only approximately those of the dequantized weights: max relative
  error (over the 30 LoRA / value-head tensors) 0.035; logprobs differ by ~3e-3. Tolerance:
  0.08. A broken gradient path (wrong layout, detached base, missing LoRA) gives errors of
  order 1.
"""

from __future__ import annotations

import pytest
import torch

from conftest import lora_config, quiet_from_pretrained, randomize_policy_
from marl_ray.model.adapter_io import base_fingerprint
from marl_ray.model import MultiAdapterModel

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRAD_RTOL = {"4bit": 1e-3, "8bit": 0.08}


def bnb_layers(model):
    import bitsandbytes as bnb

    return {n.replace(".base_layer", ""): m for n, m in model.base.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def int8_state(layer):
    """(CB, SCB) of a Linear8bitLt; the first forward moves them from the weight to layer.state."""
    w = layer.weight
    cb = w.CB if w.CB is not None else layer.state.CB
    scb = w.SCB if w.SCB is not None else layer.state.SCB
    return cb, scb


def dequantized(model) -> dict[str, torch.Tensor]:
    """Module name -> fp32 weight of every bitsandbytes layer, dequantized with bitsandbytes."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = {}
    for name, layer in bnb_layers(model).items():
        if isinstance(layer, bnb.nn.Linear4bit):
            out[name] = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        else:
            cb, scb = int8_state(layer)
            w = F.int8_vectorwise_dequant(cb, scb).float()
            torch.testing.assert_close(w, cb.float() * scb.float()[:, None] / 127, atol=1e-6, rtol=1e-6)
            out[name] = w
    return out


def raw_storage(model) -> dict[str, torch.Tensor]:
    """The packed weights and quantization statistics of every bitsandbytes layer (cloned)."""
    out = {}
    for name, layer in bnb_layers(model).items():
        qs = getattr(layer.weight, "quant_state", None)
        if qs is not None:
            out[name] = layer.weight.data.clone()
            out[name + ".absmax"] = qs.absmax.clone()
            out[name + ".shape"] = torch.tensor(list(qs.shape))
        else:
            cb, scb = int8_state(layer)
            out[name], out[name + ".SCB"] = cb.clone(), scb.clone()
    return out


def lora_grads(m, batch, name="a"):
    ids, mask, rs = batch
    for p in m.policy_parameters(name):
        p.grad = None
    logprobs, values, _ = m.policy_forward(name, ids, mask, rs)
    advantages = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
    loss = -(logprobs * advantages).mean() + (values - 0.5).pow(2).mean()
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in m.policy_state(name).items() if p.grad is not None}, logprobs


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def twins(request, base_dir):
    """(quantized model, fp32 model with the dequantized weights), same LoRA policy 'a' on both."""
    quantization = request.param
    qm = MultiAdapterModel.from_pretrained(str(base_dir), quantization=quantization)
    assert qm.quantization == quantization
    weights = dequantized(qm)
    assert len(weights) == 2 * len(ALL_LINEAR), sorted(weights)  # every decoder Linear is quantized

    from transformers import AutoModelForCausalLM

    plain = quiet_from_pretrained(AutoModelForCausalLM, str(base_dir))
    with torch.no_grad():
        for name, w in weights.items():
            plain.get_submodule(name).weight.copy_(w)
    fm = MultiAdapterModel(plain)
    assert fm.fingerprint == qm.fingerprint  # embeddings are not quantized

    qm.add_policy("a", lora_config(targets=ALL_LINEAR), seed=1)
    randomize_policy_(qm, "a", seed=2)  # non-zero LoRA B, so LoRA A gets gradients too
    fm.add_policy("a", lora_config(targets=ALL_LINEAR), seed=1)
    with torch.no_grad():
        f_state = fm.policy_state("a")
        for k, v in qm.policy_state("a").items():
            f_state[k].copy_(v)
    return quantization, qm, fm


def assert_grads_match(qm, fm, batch, rtol):
    gq, lq = lora_grads(qm, batch)
    gf, lf = lora_grads(fm, batch)
    n_lora = 2 * 2 * len(ALL_LINEAR)  # A and B, 2 layers, 7 modules
    assert len(gf) == n_lora + 2 and gq.keys() == gf.keys()  # + value head weight and bias
    worst = 0.0
    for k in gf:
        assert gf[k].norm() > 0, f"no gradient reaches {k}"
        assert gq[k].isfinite().all()
        rel = ((gq[k] - gf[k]).norm() / gf[k].norm()).item()
        worst = max(worst, rel)
        assert rel < rtol, f"{k}: relative gradient error {rel:.2e} >= {rtol}"
    return worst


@pytest.mark.parametrize("first", ["nothing", "generate", "evaluate"])
def test_gradients_match_dequantized_fp32(twins, rollout, reward_dir, first):
    quantization, qm, fm = twins
    ids, mask, rs = rollout
    before = raw_storage(qm)
    if first == "generate":
        out = qm.generate(ids[:, :rs], mask[:, :rs], "a", max_new_tokens=4, do_sample=False)
        assert out.shape == (ids.shape[0], rs + 4)
    elif first == "evaluate":
        if "rm" not in qm.roles:
            qm.add_reward("rm", reward_dir)
        ev = qm.evaluate(ids, mask, ["a"] * ids.shape[0], ["rm"] * ids.shape[0], rs)
        assert ev.scores_B.isfinite().all()
    # eval-mode passes must leave the packed weights as they were (no CPU repacking)
    after = raw_storage(qm)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), f"{k} changed"
    for layer in bnb_layers(qm).values():
        assert not getattr(layer.weight, "packing_format_for_cpu", False)

    worst = assert_grads_match(qm, fm, rollout, GRAD_RTOL[quantization])
    if quantization == "4bit":
        assert worst < 1e-5  # same arithmetic as the fp32 twin (measured: 0.0)


def test_fingerprint_ignores_quantization(base_dir, other_base_dir):
    from transformers import AutoModelForCausalLM

    fps = {q: MultiAdapterModel.from_pretrained(str(base_dir), quantization=q).fingerprint
           for q in ("none", "8bit", "4bit")}
    assert len(set(fps.values())) == 1, fps
    assert base_fingerprint(quiet_from_pretrained(AutoModelForCausalLM, str(other_base_dir))) != fps["none"]


def test_4bit_evaluate_equals_separate_passes(base_dir, reward_dir, rollout):
    """Mixed-adapter batches on a 4-bit base: one pass equals the per-role passes."""
    ids, mask, rs = rollout
    m = MultiAdapterModel.from_pretrained(str(base_dir), quantization="4bit")
    m.add_policy("a", lora_config(), seed=1)
    m.add_policy("b", lora_config(), seed=2)
    randomize_policy_(m, "a", seed=3)
    randomize_policy_(m, "b", seed=4)
    m.add_reward("rm", reward_dir)
    policies = ["b", "a", "b"]
    ev = m.evaluate(ids, mask, policies, ["rm"] * 3, rs)
    with torch.no_grad():
        for i, p in enumerate(policies):
            lp, v, _ = m.policy_forward(p, ids[i:i + 1], mask[i:i + 1], rs)
            torch.testing.assert_close(ev.logprobs_BR[i:i + 1], lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ev.values_BR[i:i + 1], v, atol=1e-5, rtol=0)
    torch.testing.assert_close(ev.scores_B, m.reward_scores("rm", ids, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(ev.ref_logprobs_BR, m.reference_logprobs(ids, mask, rs), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(twins, rollout):
    """Quantized bases train with checkpointed decoder layers by default (the fp32 twin does not,
    so test_gradients_match_dequantized_fp32 compares the two routes); on one model both routes
    give the same gradients."""
    quantization, qm, fm = twins
    assert qm.gradient_checkpointing and not fm.gradient_checkpointing
    plain, _ = lora_grads(fm, rollout)
    fm.gradient_checkpointing = True
    try:
        checkpointed, _ = lora_grads(fm, rollout)
    finally:
        fm.gradient_checkpointing = False
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7)
    layer = fm.base.get_decoder().layers[0]
    assert "forward" not in vars(layer), "the checkpointing wrapper must be removed after the pass"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_converting_load_reads_the_same_weights(base_dir, quantization, monkeypatch):
    """A quantized base loaded with low_memory (what a model host asks for) is read tensor by tensor
    (pread, no mapped checkpoint): same packed weights and statistics as transformers' default
    mapped load, which is what a plain load does."""
    from marl_ray.model import tweaks

    calls = []
    streamed = tweaks.streamed_checkpoint_reads
    monkeypatch.setattr(tweaks, "streamed_checkpoint_reads", lambda **kw: calls.append(kw) or streamed(**kw))
    lean = raw_storage(MultiAdapterModel.from_pretrained(str(base_dir), quantization=quantization, low_memory=True))
    assert calls == [{"keep_large_blocks_mapped": True}]
    mapped = raw_storage(MultiAdapterModel.from_pretrained(str(base_dir), quantization=quantization))
    assert len(calls) == 1, "a plain load changes no process-wide setting"
    assert lean.keys() == mapped.keys() and lean
    for k in lean:
        assert torch.equal(lean[k], mapped[k]), k
