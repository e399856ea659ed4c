"""What "training one policy changes nothing else" means, checked the same way on every base
(tests/model/test_multi_adapter.py on Llama in three precisions, tests/model/test_architectures.py on
every architecture x precision)."""

from __future__ import annotations

from itertools import chain

import torch


def quant_state(model) -> dict:
    """Cloned raw quantization state of every bitsandbytes layer (4-bit: absmax + code table; 8-bit: the
    int8 matrix CB + row scales SCB, which the first forward moves from the weight to the layer's state)."""
    import bitsandbytes as bnb

    out = {}
    for name, mod in model.base.named_modules():
        if not isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue  # (peft's LoRA wrappers expose their base layer's weight too)
        w = mod.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax.clone()
            out[f"{name}.code"] = qs.code.clone()
        if hasattr(w, "SCB"):
            state = mod.state
            scb = w.SCB if w.SCB is not None else state.SCB
            cb = w.CB if w.CB is not None else state.CB
            assert scb is not None and cb is not None and cb.dtype == torch.int8
            out[f"{name}.SCB"] = scb.clone()
            out[f"{name}.CB"] = cb.clone()
    return out


def assert_frozen_except_policies(m):
    trainable = {id(p) for name in m.policies for p in m.policy_parameters(name)}
    assert trainable
    for n, p in m.named_parameters():
        assert p.requires_grad == (id(p) in trainable), f"{n}: requires_grad={p.requires_grad}"


def check_training_a_isolates(m, ids, mask, rs, quantized: bool, steps: int = 3):
    """Train policy "a" of `m` (policies a and b, reward adapter "rm") for `steps` AdamW steps, the other
    roles' passes in between as PPO runs them; then the base (weights, buffers, quantization state), the
    reward adapter and score head, the reference and policy b are bit for bit as before, a changed, no
    frozen tensor got a gradient, and only policies' tensors require grad."""
    qs0 = quant_state(m) if quantized else {}
    assert bool(qs0) == quantized, "a quantized base without bitsandbytes layers (or the reverse)"
    # peft's set_adapter switches requires_grad on for the adapter it activates: the model undoes that
    scores0 = m.reward_scores("rm", ids, mask)
    assert_frozen_except_policies(m)
    m.evaluate(ids, mask, ["a", "b", "a"], ["rm"] * 3, rs)
    assert_frozen_except_policies(m)

    a_params = {id(p) for p in m.policy_parameters("a")}
    snapshot = {n: t.detach().clone() for n, t in chain(m.named_parameters(), m.named_buffers())
                if id(t) not in a_params}
    assert any(".lora_A.rm." in n for n in snapshot) and "score_heads.rm.weight" in snapshot
    assert any(".lora_B.b." in n for n in snapshot) and "value_heads.b.weight" in snapshot
    a0 = {k: v.detach().clone() for k, v in m.policy_state("a").items()}
    b0 = {k: v.detach().clone() for k, v in m.policy_state("b").items()}
    ref0 = m.reference_logprobs(ids, mask, rs)
    with torch.no_grad():
        b_out0 = m.policy_forward("b", ids, mask, rs)[:2]

    opt = torch.optim.AdamW(m.policy_parameters("a"), lr=1e-2)
    for _ in range(steps):
        logprobs, values, _ = m.policy_forward("a", ids, mask, rs)
        loss = -logprobs.mean() + (values - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.reward_scores("rm", ids, mask)  # the other roles' passes in between, as PPO runs them
        m.reference_logprobs(ids, mask, rs)

    for n, t in chain(m.named_parameters(), m.named_buffers()):
        if id(t) not in a_params:
            assert torch.equal(t, snapshot[n]), f"{n} changed while training policy a"
            assert t.grad is None, f"{n} received a gradient"
    qs1 = quant_state(m) if quantized else {}
    assert qs1.keys() == qs0.keys()
    for k in qs0:
        assert torch.equal(qs0[k], qs1[k]), f"quantization state {k} changed"
    for k, v in m.policy_state("b").items():
        assert torch.equal(v, b0[k]), f"policy b's {k} changed"
    for k, v in m.policy_state("a").items():
        assert not torch.equal(v, a0[k]), f"policy a's {k} did not train"
    assert torch.equal(m.reference_logprobs(ids, mask, rs), ref0)
    assert torch.equal(m.reward_scores("rm", ids, mask), scores0)
    with torch.no_grad():
        for x, y in zip(m.policy_forward("b", ids, mask, rs)[:2], b_out0):
            assert torch.equal(x, y)
    assert_frozen_except_policies(m)
