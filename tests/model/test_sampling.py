"""The HF rollout backend samples what its settings say (the vLLM backend is checked against the same
reference in tests/with_vllm): temperature, top-k and top-p as distributions, greedy, exact lengths."""

from __future__ import annotations

import pytest
import torch
from sampling_utils import check_samples, expected_distribution

from conftest import lora_config, quiet_from_pretrained, randomize_policy_

SETTINGS = [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.7, 20, 0.9)]


@pytest.fixture(scope="module")
def model(base_dir):
    from marl_ray.model import MultiAdapterModel

    m = quiet_from_pretrained(MultiAdapterModel, str(base_dir))
    m.add_policy("a", lora_config(), seed=0)
    randomize_policy_(m, "a", seed=3)
    return m


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_first_token_distribution(model, temperature, top_k, top_p):
    prompt = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        h = model.hidden(prompt, torch.ones_like(prompt), "a")
        expected = expected_distribution(model.lm_logits(h)[0, -1], temperature, top_k, top_p)
    n = 3000
    ids = prompt.repeat(n, 1)
    torch.manual_seed(0)
    out = model.generate(ids, torch.ones_like(ids), "a", max_new_tokens=1, temperature=temperature, top_k=top_k,
                         top_p=top_p)
    check_samples(out[:, -1].tolist(), expected)


def test_top_k_one_is_greedy(model):
    ids = torch.tensor([[1, 50, 60, 70], [1, 80, 90, 100]])
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, mask, "a", max_new_tokens=8, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(ids, mask, "a", max_new_tokens=8, top_k=1)
    assert torch.equal(greedy, sampled)
    assert greedy.shape == (2, 12)  # exact length: min_new_tokens defaults to max_new_tokens


@pytest.mark.parametrize("kind", ["hf", "lean"])
def test_stop_token_ids_end_a_response_like_eos(model, kind):
    """A token in settings.stop_token_ids (a chat template's end of turn) ends a response as EOS does:
    the tokens before it are as without it, it is kept, and everything after is padding (mask 0)."""
    from dataclasses import replace

    from marl_ray.model import sampling

    prompts = [[1, 50, 60, 70], [1, 80, 90, 100, 110]]
    plain = sampling.SamplingSettings(max_new_tokens=8, min_new_tokens=1, do_sample=False, stop_at_eos=True)
    s = sampling.make(kind, model.base)
    free = s.sample(model, prompts, ["a", "a"], plain, seed=0)
    stop = int(free.responses[0, 1])  # greedy: the second token of row 0 (not EOS)
    assert stop not in (model.base.generation_config.eos_token_id, 0)
    stopped = s.sample(model, prompts, ["a", "a"], replace(plain, stop_token_ids=(stop,)), seed=0)
    for i in range(2):
        hits = ((free.responses[i] == stop) & free.response_mask[i].bool()).nonzero()
        if len(hits):
            end = int(hits[0]) + 1
            assert stopped.responses[i, :end].tolist() == free.responses[i, :end].tolist()
            assert stopped.response_mask[i].tolist() == [1] * end + [0] * (8 - end)
        else:
            assert torch.equal(stopped.responses[i], free.responses[i])
            assert torch.equal(stopped.response_mask[i], free.response_mask[i])
    assert stopped.response_mask[0].sum() <= 2
    # without stop_at_eos every response has max_new_tokens tokens and never holds a stop token
    exact = s.sample(model, prompts, ["a", "a"], replace(plain, stop_at_eos=False, stop_token_ids=(stop,)), seed=0)
    assert exact.response_mask.all() and not (exact.responses == stop).any()
