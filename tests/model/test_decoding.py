"""marl_ray.model.decoding: the lean Llama loop samples exactly what HF `generate` samples.

Same seed, same settings: the same tokens, token for token (the logits agree bit for bit), for
greedy and sampling, top-k/top-p/temperature, min_new_tokens with EOS (rows that end early, a
batch that ends early), left padding, one policy, mixed policies with the reference, fp32 and bf16.
Bases or settings it does not cover go to HF `generate`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import lora_config, quiet_from_pretrained, randomize_policy_


def _model(base_dir, dtype="fp32"):
    from marl_ray.model import MultiAdapterModel

    m = quiet_from_pretrained(MultiAdapterModel, str(base_dir), dtype=dtype)
    for i, name in enumerate(("a", "b")):
        m.add_policy(name, lora_config(), seed=i)
        randomize_policy_(m, name, seed=10 + i)
    return m


@pytest.fixture(scope="module")
def model(base_dir):
    return _model(base_dir)


def _prompts(padded: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        ids[:3, :3] = 0
        mask[:3, :3] = 0
        ids[0, :5] = 0
        mask[0, :5] = 0
    return ids, mask


def _both(m, ids, mask, policies, **kw):
    """HF generate's and the lean loop's tokens, with HF's arithmetic (the "exact" sampler)."""
    from marl_ray.model import sampling

    outs = []
    default = m.sampler
    try:
        for sampler in (sampling.HFGenerate(), sampling.LeanDecode(exact=True)):
            m.sampler = sampler
            torch.manual_seed(1234)
            outs.append(m.generate(ids, mask, policies, **kw))
    finally:
        m.sampler = default
    return outs


SETTINGS = [
    dict(do_sample=False),
    dict(),  # temperature 1, top_k 0, top_p 1: the reference workload's
    dict(top_k=1),
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_p=0.8),
    dict(min_new_tokens=2, eos_token_id=list(range(2, 200, 3))),  # EOS likely: rows end early
    dict(min_new_tokens=0, eos_token_id=list(range(512)), do_sample=False),  # every row ends at once
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("policies", ["a", ["a", "b", "ref", "a", "ref", "b"]], ids=["one", "mixed"])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={str(v)[:8]}" for k, v in kw.items()) or "default")
def test_lean_sampling_is_hf_generate(model, padded, policies, kw):
    from marl_ray.model import decoding

    assert decoding.supports(model.base)
    ids, mask = _prompts(padded)
    hf, lean = _both(model, ids, mask, policies, max_new_tokens=10, **kw)
    assert lean.shape == hf.shape and torch.equal(lean, hf)
    if "eos_token_id" in kw and kw.get("min_new_tokens") == 0:
        assert hf.shape[1] == ids.shape[1] + 1  # the batch ended after one token


def test_lean_sampling_is_hf_generate_bf16(base_dir):
    m = _model(base_dir, "bf16")
    ids, mask = _prompts(True)
    for kw in (dict(do_sample=False), dict()):
        hf, lean = _both(m, ids, mask, ["a", "b", "a", "ref", "b", "a"], max_new_tokens=8, **kw)
        assert torch.equal(lean, hf)


@pytest.mark.parametrize("prefill", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_sampling_logits_are_hfs(base_dir, model, dtype, padded, prefill, monkeypatch):
    """The default decode (LoRA layers computed by decoding._project, eager attention in fp32 on a
    CPU; sdpa for a prompt longer than EAGER_MAX_LEN): each step's logits are HF's forward's over
    the sampled sequence so far, to rounding, for mixed policies and the reference, with and
    without left padding."""
    from marl_ray.model import decoding
    from marl_ray.model import positions

    if prefill == "sdpa":
        monkeypatch.setattr(decoding, "EAGER_MAX_LEN", 0)
    m = model if dtype == "fp32" else _model(base_dir, "bf16")
    ids, mask = _prompts(padded)
    names = ["a", "b", "ref", "a", "ref", "b"]
    steps = []
    torch.manual_seed(7)
    with m.route(names):
        out = decoding.sample(m.lean(), ids, mask, lora_rows=m.lora_rows(names), logits_out=steps,
                              max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, eos_token_id=None, pad_token_id=0)
    assert out.shape == (6, ids.shape[1] + 8) and len(steps) == 8
    full = torch.cat([mask, torch.ones(6, 8, dtype=mask.dtype)], 1)
    with torch.no_grad(), m.route(names):
        hf = m.base(input_ids=out, attention_mask=full, position_ids=positions(full)).logits.float()
    P = ids.shape[1]
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == "fp32" else dict(atol=0.15, rtol=0.05)
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits, hf[:, P - 1 + t], **tol)
    # the default path of MultiAdapterModel.generate is this one
    torch.manual_seed(7)
    assert torch.equal(m.generate(ids, mask, names, max_new_tokens=8, min_new_tokens=8, pad_token_id=0), out)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_scored_is_evaluate(model, reward_dir, padded):
    """generate_scored's logprobs, values and entropies (read off the decode steps) are evaluate's
    policy pass's to rounding; the tokens are generate's under the same seed; none with a
    reference row or through HF generate."""
    from marl_ray.model import Evaluation

    if "rw" not in model.rewards:
        model.add_reward("rw", reward_dir)
    ids, mask = _prompts(padded)
    names = ["a", "b", "a", "b", "b", "a"]
    torch.manual_seed(3)
    out, scored = model.generate_scored(ids, mask, names, max_new_tokens=7)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, mask, names, max_new_tokens=7), out)
    full = torch.cat([mask, torch.ones(6, 7, dtype=mask.dtype)], 1)
    ev = model.evaluate(out, full, names, ["rw"] * 6, ids.shape[1])
    with_rollout = model.evaluate(out, full, names, ["rw"] * 6, ids.shape[1], rollout=scored)
    assert isinstance(with_rollout, Evaluation)
    for k in ("logprobs_BR", "values_BR", "entropy_BR"):
        assert getattr(scored, k).shape == (6, 7)
        torch.testing.assert_close(getattr(scored, k), getattr(ev, k), atol=1e-5, rtol=1e-5)
        assert torch.equal(getattr(with_rollout, k), getattr(scored, k))  # taken as they are
    for k in ("ref_logprobs_BR", "scores_B"):  # the pass without policy rows scores the same
        torch.testing.assert_close(getattr(with_rollout, k), getattr(ev, k), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="rollout scores of shape"):
        model.evaluate(out[:, :-1], full[:, :-1], names, ["rw"] * 6, ids.shape[1], rollout=scored)
    assert model.generate_scored(ids, mask, ["a", "ref", "a", "b", "b", "a"], max_new_tokens=3)[1] is None
    from marl_ray.model import sampling

    default, model.sampler = model.sampler, sampling.HFGenerate()
    try:
        assert model.generate_scored(ids, mask, names, max_new_tokens=3)[1] is None
    finally:
        model.sampler = default


def test_generate_scored_is_evaluate_bf16(base_dir, reward_dir):
    """With a bf16 base (ppo.rollout_logprobs is on there by default) the decode steps' logprobs,
    values and entropies differ from the scoring pass's by bf16 rounding only: a few 1e-3 on
    average (a misplaced position or a missing adapter differs by order 1)."""
    m = _model(base_dir, "bf16")
    m.add_reward("rw", reward_dir)
    ids, mask = _prompts(True)
    names = ["a", "b", "a", "b", "b", "a"]
    torch.manual_seed(3)
    out, scored = m.generate_scored(ids, mask, names, max_new_tokens=7)
    full = torch.cat([mask, torch.ones(6, 7, dtype=mask.dtype)], 1)
    ev = m.evaluate(out, full, names, ["rw"] * 6, ids.shape[1])
    for k in ("logprobs_BR", "values_BR", "entropy_BR"):
        diff = (getattr(scored, k) - getattr(ev, k)).abs()
        assert diff.mean() < 1e-2 and diff.max() < 0.05, (k, diff.mean(), diff.max())
    # the reward and reference columns do not come from the decode: the pass's, as they are
    with_rollout = m.evaluate(out, full, names, ["rw"] * 6, ids.shape[1], rollout=scored)
    for k in ("ref_logprobs_BR", "scores_B"):
        torch.testing.assert_close(getattr(with_rollout, k), getattr(ev, k), atol=1e-6, rtol=1e-6)


def test_min_new_tokens_and_eos(model):
    """EOS is never drawn before min_new_tokens; after it, a row that drew EOS gets only padding."""
    ids, mask = _prompts(False)
    free = model.generate(ids[:1], mask[:1], "a", max_new_tokens=6, do_sample=False)
    eos = int(free[0, ids.shape[1] + 1])  # the 2nd greedy token becomes EOS
    ended = model.generate(ids[:1], mask[:1], "a", max_new_tokens=6, min_new_tokens=0, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    assert ended.shape[1] == ids.shape[1] + 2 and int(ended[0, -1]) == eos
    later = model.generate(ids[:1], mask[:1], "a", max_new_tokens=6, min_new_tokens=3, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    assert eos not in later[0, ids.shape[1]:ids.shape[1] + 3].tolist()
    # two rows, one ends early: it is padded while the other goes on
    both = model.generate(ids[:2], mask[:2], "a", max_new_tokens=6, min_new_tokens=0, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    hf, _ = _both(model, ids[:2], mask[:2], "a", max_new_tokens=6, min_new_tokens=0, do_sample=False,
                  eos_token_id=eos, pad_token_id=0)
    assert torch.equal(both, hf)


def test_other_bases_and_settings_use_hf_generate(model, monkeypatch):
    from marl_ray.model import decoding

    calls = []
    real = decoding.sample
    monkeypatch.setattr(decoding, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = _prompts(False)
    model.generate(ids, mask, "a", max_new_tokens=3)
    assert calls == [1]
    # a logits processor from the base's generation config that `sample` does not apply
    gcfg = model.base.generation_config
    monkeypatch.setattr(gcfg, "repetition_penalty", 1.3)
    assert not decoding.generation_config_is_plain(gcfg)
    hf_out = model.generate(ids, mask, "a", max_new_tokens=3, do_sample=False)
    assert calls == [1]
    monkeypatch.setattr(gcfg, "repetition_penalty", 1.0)
    assert decoding.generation_config_is_plain(gcfg)
    # a hook on a module the lean loop skips: HF's forward runs it, so HF generate it is
    handle = model.base.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert not decoding.supports(model.base)
        model.generate(ids, mask, "a", max_new_tokens=3)
        assert calls == [1]
    finally:
        handle.remove()
    assert decoding.supports(model.base)
    assert hf_out.shape == (6, ids.shape[1] + 3)


def _passes(m, lean: bool, fn):
    m.passes = "auto" if lean else "hf"
    try:
        return fn()
    finally:
        m.passes = "auto"


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("keep_from", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_lean_passes_are_the_hf_decoder(model, padded, keep_from, attention, monkeypatch):
    """Scoring passes through LeanLlama.hidden (eager or sdpa attention, last layer on kept
    positions only) give the HF decoder's hidden states at every real position, under mixed
    adapters too."""
    from marl_ray.model import decoding

    if attention == "sdpa":  # what sequences longer than EAGER_MAX_LEN get
        monkeypatch.setattr(decoding, "EAGER_MAX_LEN", 0)
    ids, mask = _prompts(padded)
    names = ["a", "b", "ref", "a", "ref", "b"]
    with torch.no_grad():
        hf = _passes(model, False, lambda: model.hidden(ids, mask, names, keep_from=keep_from))
        lean = model.hidden(ids, mask, names, keep_from=keep_from)
    assert lean.shape == hf.shape == (6, ids.shape[1] - keep_from, model.hidden_size)
    real = mask[:, keep_from:].bool()
    torch.testing.assert_close(lean[real], hf[real], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(lean).all()  # left-pad queries with nothing to attend stay finite


@pytest.mark.parametrize("checkpoint", [False, True])
def test_lean_training_pass_gradients_are_the_hf_decoders(model, checkpoint):
    """policy_forward's logprobs, values and LoRA/value-head gradients agree between the two paths
    (with gradient checkpointing too), on left-padded prompts."""
    prompt, prompt_mask = _prompts(True)  # left-padded prompts + 5 response tokens
    ids = torch.cat([prompt, torch.randint(4, 200, (6, 5), generator=torch.Generator().manual_seed(1))], 1)
    mask = torch.cat([prompt_mask, torch.ones(6, 5, dtype=prompt_mask.dtype)], 1)
    mask[1, -2:] = 0  # a response that ended early
    P = prompt.shape[1]
    params = model.policy_parameters("a")
    real = mask[:, P:].bool()  # padded positions carry garbage in both paths: only real ones count

    def run():
        lp, v, _ = model.policy_forward("a", ids, mask, response_start=P)
        lp, v = lp.where(real, 0.0), v.where(real, 0.0)
        grads = torch.autograd.grad(lp.sum() + 0.1 * v.square().sum(), params)
        return [lp.detach(), v.detach()] + list(grads)

    hf = _passes(model, False, run)
    model.gradient_checkpointing = checkpoint
    try:
        lean = run()
    finally:
        model.gradient_checkpointing = False
    for a, b in zip(lean, hf):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert all(g.abs().sum() > 0 for g in lean[2:])


def test_lean_passes_bf16(base_dir):
    m = _model(base_dir, "bf16")
    ids, mask = _prompts(True)
    with torch.no_grad():
        hf = _passes(m, False, lambda: m.hidden(ids, mask, ["a", "b", "ref"] * 2, keep_from=3))
        lean = m.hidden(ids, mask, ["a", "b", "ref"] * 2, keep_from=3)
    real = mask[:, 3:].bool()
    assert lean.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the two attention kernels round differently
    torch.testing.assert_close(lean[real].float(), hf[real].float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("rows", [[("a", 0, 6)], [("a", 0, 2), ("b", 2, 4), (None, 4, 6)]], ids=["one", "mixed"])
def test_project_is_peft_lora_fp32(model, rows):
    """decoding._project computes a peft LoRA layer's output itself: in fp32, peft's bit for bit
    (one adapter, and row ranges under different adapters and none)."""
    from marl_ray.model import decoding

    layer = model.base.model.layers[1].self_attn.q_proj
    assert decoding._plain_lora(layer)
    x = torch.randn(6, 5, model.hidden_size, generator=torch.Generator().manual_seed(3))
    names = [n if n is not None else "__base__" for n, lo, hi in rows for _ in range(lo, hi)]
    with torch.no_grad(), model.route(names):
        want = layer(x)
        got = decoding._project(layer, x, rows)
    assert torch.equal(got, want)
    assert not torch.equal(got[:2], layer.base_layer(x[:2]))  # the adapter did something


# ------------------------------------------------------------------ the other families it serves
# Qwen2 (biases on q/k/v), Qwen3 (q/k RMSNorm per head, tied embeddings), Mistral (a sliding window of
# 16 in the tiny config: prompts of 7 + 12 new tokens run past it, so the window masks real keys).
LEAN_ARCHS = ["qwen2", "qwen3", "mistral"]
HF_ARCHS = ["gemma2", "gemma3", "phi3", "gpt2"]


@pytest.fixture(scope="module")
def arch_model(tmp_path_factory):
    """arch -> a MultiAdapterModel (fp32) on a tiny base of that family with policies a and b, built once."""
    from marl_ray.data.tiny import build_tiny

    from conftest import TEXTS

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = _model(build_tiny(tmp_path_factory.mktemp(f"dec_{arch}"), texts=TEXTS, arch=arch))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_sampling_is_hf_generate_other_families(arch_model, arch):
    """The exact lean loop on Qwen2, Qwen3 and Mistral draws HF generate's tokens under the same seed:
    greedy and sampled, left-padded, one policy and mixed policies with the reference, past Mistral's window."""
    from marl_ray.model import decoding, sampling

    m = arch_model(arch)
    assert decoding.supports(m.base) and isinstance(m.sampler, sampling.LeanDecode)
    ids, mask = _prompts(True)
    window = m.lean().window
    assert (window is not None) == (arch == "mistral")
    if window is not None:
        assert ids.shape[1] + 12 > window
    for policies in ("a", ["a", "b", "ref", "a", "ref", "b"]):
        for kw in (dict(do_sample=False), dict(), dict(temperature=0.7, top_k=20, top_p=0.9),
                   dict(min_new_tokens=2, eos_token_id=list(range(2, 200, 3)))):
            hf, lean = _both(m, ids, mask, policies, max_new_tokens=12, **kw)
            assert torch.equal(lean, hf), (policies, kw)


def test_mistral_window_is_applied(arch_model):
    """Without the sliding window, the lean loop's logits past it are not HF's: the test above checks it."""
    from marl_ray.model import decoding

    m = arch_model("mistral")
    lean = m.lean()
    ids, mask = _prompts(False)

    def logits(window):
        steps = []
        lean.window = window
        try:
            with m.route(["a"] * 6):
                decoding.sample(lean, ids, mask, logits_out=steps, max_new_tokens=12, min_new_tokens=12,
                                do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                                pad_token_id=0)
        finally:
            lean.window = m.base.config.sliding_window
        return torch.stack(steps, 1)

    windowed, unbounded = logits(16), logits(None)
    within = 16 - ids.shape[1] + 1  # steps whose query sees at most 16 keys
    torch.testing.assert_close(windowed[:, :within], unbounded[:, :within], atol=0, rtol=0)
    assert (windowed[:, within:] - unbounded[:, within:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", LEAN_ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_fast_sampling_and_passes_are_hfs_other_families(arch_model, arch, padded):
    """The default (fast) decode's step logits and the lean scoring pass's hidden states are HF's
    forward's to rounding on Qwen2, Qwen3 and Mistral, under mixed policies and the reference."""
    from marl_ray.model import decoding, positions

    m = arch_model(arch)
    ids, mask = _prompts(padded)
    names = ["a", "b", "ref", "a", "ref", "b"]
    steps = []
    torch.manual_seed(7)
    with m.route(names):
        out = decoding.sample(m.lean(), ids, mask, lora_rows=m.lora_rows(names), logits_out=steps,
                              max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, eos_token_id=None, pad_token_id=0)
    full = torch.cat([mask, torch.ones(6, 12, dtype=mask.dtype)], 1)
    with torch.no_grad(), m.route(names):
        hf = m.base(input_ids=out, attention_mask=full, position_ids=positions(full))
    P = ids.shape[1]
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits, hf.logits[:, P - 1 + t].float(), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        lean = m.hidden(out, full, names, keep_from=4)
        want = _passes(m, False, lambda: m.hidden(out, full, names, keep_from=4))
    real = full[:, 4:].bool()
    torch.testing.assert_close(lean[real], want[real], atol=2e-5, rtol=1e-4)


def test_qwen3_bf16_is_hf_generate(tmp_path):
    """q/k norms in bf16 (they compute in fp32 and cast back): still HF generate's tokens."""
    from marl_ray.data.tiny import build_tiny

    from conftest import TEXTS

    m = _model(build_tiny(tmp_path / "qwen3", texts=TEXTS, arch="qwen3"), "bf16")
    ids, mask = _prompts(True)
    for kw in (dict(do_sample=False), dict()):
        hf, lean = _both(m, ids, mask, ["a", "b", "a", "ref", "b", "a"], max_new_tokens=8, **kw)
        assert torch.equal(lean, hf)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_other_families_fall_back_with_one_line(tmp_path, arch, caplog):
    """Gemma 2/3, Phi-3 and GPT-2 are not served: `make("auto")` gives HF generate and says so in one line."""
    import logging

    from marl_ray.data.tiny import build_model
    from marl_ray.model import decoding, sampling

    base = build_model(arch, "tiny")
    base.config._attn_implementation = "sdpa"
    with caplog.at_level(logging.INFO, logger="marl_ray"):
        s = sampling.make("auto", base)
    lines = [r.getMessage() for r in caplog.records if "HF generate" in r.getMessage()]
    assert not decoding.supports(base) and isinstance(s, sampling.HFGenerate)
    assert len(lines) == 1 and type(base).__name__ in lines[0], lines
