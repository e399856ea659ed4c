"""The output head in chunks of positions (passes.ChunkedHead, MultiAdapterModel.head_scores /
policy_pass): the logprobs, entropies, values and gradients of the unchunked path (logits of every
position, then log_softmax / entropy), fp32 tightly and bf16 loosely, with no chunk's logits kept
for the backward. On the tiny local Llama (H=64, 2 layers, 512-token vocabulary), CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import lora_config, randomize_policy_
from marl_ray.algorithms.ppo import entropy_from_logits, logprobs_from_logits
from marl_ray.model.passes import HEAD_CHUNK_LOGITS, ChunkedHead, MultiAdapterModel, head_chunk_positions


def unchunked(h_NH, weight_VH, bias_V, tokens_N, softcap):
    logits = torch.nn.functional.linear(h_NH, weight_VH, bias_V).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logprobs_from_logits(logits, tokens_N), entropy_from_logits(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 3.0)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_head_is_the_unchunked_head(dtype, bias, softcap, chunk):
    g = torch.Generator().manual_seed(0)
    N, H, V = 23, 16, 300
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g)
    h = torch.randn(N, H, generator=g).to(dtype)
    upstream = torch.randn(N, generator=g)  # a loss with a weight per position

    h1 = h.clone().requires_grad_()
    lp1, ent1 = ChunkedHead.apply(h1, weight, b, tokens, chunk, softcap, True)
    (lp1 * upstream).sum().backward()
    h2 = h.clone().requires_grad_()
    lp2, ent2 = unchunked(h2, weight, b, tokens, softcap)
    (lp2 * upstream).sum().backward()

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert lp1.dtype == ent1.dtype == torch.float32 and h1.grad.dtype == dtype
    torch.testing.assert_close(lp1, lp2, **tol)
    torch.testing.assert_close(ent1, ent2.detach(), **tol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol)
    assert h1.grad.abs().sum() > 0
    assert not ent1.requires_grad  # the entropy is a statistic: no gradient


def test_no_logits_are_kept_for_the_backward():
    """Everything the chunked head keeps for the backward is one (H,) row per position, not logits."""
    N, H, V = 64, 8, 4096
    weight = torch.randn(V, H)
    tokens = torch.randint(0, V, (N,))
    h = torch.randn(N, H, requires_grad=True)

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]

    chunked = saved_bytes(lambda: ChunkedHead.apply(h, weight, None, tokens, 16, None, True))
    full = saved_bytes(lambda: unchunked(h, weight, None, tokens, None))
    assert chunked <= N * H * 4
    assert full >= N * V * 4  # the unchunked path keeps (at least) the log-softmax of every position


def test_chunk_size_setting():
    assert head_chunk_positions(None, 49152) == HEAD_CHUNK_LOGITS // 49152 == 341
    assert head_chunk_positions(None, 1 << 30) == 16
    assert head_chunk_positions(5, 49152) == 5
    with pytest.raises(ValueError, match="head_chunk=0"):
        head_chunk_positions(0, 100)


def test_config_refuses_a_bad_chunk_size():
    from marl_ray.config import ConfigError, ModelSpec
    from marl_ray.config.loader import validate

    assert ModelSpec(base="m").head_chunk is None
    validate(ModelSpec(base="m", head_chunk=64), "model")
    with pytest.raises(ConfigError, match="model.head_chunk"):
        validate(ModelSpec(base="m", head_chunk=0), "model")


# ---------------------------------------------------------------------------- on the model
def _model(base_dir, dtype="fp32", head_chunk=None, targets=None):
    m = MultiAdapterModel(MultiAdapterModel.from_pretrained(str(base_dir), dtype=dtype).base, head_chunk=head_chunk)
    m.add_policy("a", lora_config(targets=targets or ["q_proj", "v_proj"]), seed=1, value_head=True)
    randomize_policy_(m, "a", seed=3)
    return m


def _unchunked_pass(m, ids, mask, rs):
    lp, v, logits = m.policy_forward("a", ids, mask, rs)
    return lp, v, entropy_from_logits(logits)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "lm_head"]], ids=["plain-head", "lora-head"])
def test_training_pass_is_the_unchunked_one(base_dir, rollout, dtype, targets):
    """policy_pass (head in chunks of 3 positions; with LoRA on the head: its own forward per chunk
    under checkpointing) gives policy_forward's logprobs, values, entropies and LoRA/value-head
    gradients."""
    ids, mask, rs = rollout
    m = _model(base_dir, dtype, head_chunk=3, targets=targets)
    assert (m._plain_head() is None) == (targets is not None)
    real = mask[:, rs:].bool()
    params = m.policy_parameters("a")

    def run(fn):
        lp, v, ent = fn(m, ids, mask, rs)
        lp, v = lp.where(real, 0.0), v.where(real, 0.0)
        grads = torch.autograd.grad(lp.sum() + 0.1 * v.square().sum(), params)
        return [lp.detach(), v.detach(), ent.detach().where(real, 0.0)] + [g.float() for g in grads]

    chunked = run(lambda m, *a: m.policy_pass("a", *a))
    full = run(_unchunked_pass)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(chunked, full):
        torch.testing.assert_close(a, b, **tol)
    assert all(g.abs().sum() > 0 for g in chunked[3:])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scoring_passes_are_the_unchunked_ones(base_dir, rollout, dtype):
    """evaluate (policy logprobs, values, entropies; reference logprobs) and reference_logprobs with the
    head in chunks of 2 positions give the full logits' numbers."""
    ids, mask, rs = rollout
    m = _model(base_dir, dtype, head_chunk=2)
    B = ids.shape[0]
    with torch.no_grad():
        ev = m.evaluate(ids, mask, ["a"] * B, [None] * B, rs)
        lp, v, ent = _unchunked_pass(m, ids, mask, rs)
        h_ref = m.hidden(ids, mask, "ref", keep_from=rs - 1)[:, :-1]
        ref = logprobs_from_logits(m.lm_logits(h_ref), ids[:, rs:])
        ref_chunked = m.reference_logprobs(ids, mask, rs)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=3e-2, rtol=3e-2)
    real = mask[:, rs:].bool()
    for got, want in [(ev.logprobs_BR, lp), (ev.values_BR, v), (ev.entropy_BR, ent), (ev.ref_logprobs_BR, ref),
                      (ref_chunked, ref)]:
        torch.testing.assert_close(got[real], want[real], **tol)
    assert (ev.logprobs_BR - ev.ref_logprobs_BR)[real].abs().max() > 1e-3  # the policy is not the reference


def test_decode_scores_are_the_scoring_pass(base_dir):
    """The decode's per-step logprobs and entropies (no (B, V) tensor kept per step) are evaluate's."""
    m = _model(base_dir)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    torch.manual_seed(0)
    out, scores = m.generate_scored(ids, mask, "a", max_new_tokens=6, do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    assert scores is not None and scores.logprobs_BR.shape == (2, 6)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ev = m.evaluate(out, full_mask, ["a", "a"], [None, None], ids.shape[1])
    torch.testing.assert_close(scores.logprobs_BR, ev.logprobs_BR, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores.entropy_BR, ev.entropy_BR, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores.values_BR, ev.values_BR, atol=1e-4, rtol=1e-4)
