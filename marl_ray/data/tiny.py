"""Build small Llama-architecture models and tokenizers locally (seeded, no downloads).

Both are saved as ordinary Hugging Face folders, so everything downstream goes through the
same `from_pretrained` code a real hub model would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# The sizes of ../shared/BENCHMARK.md, plus a "tiny" one for unit tests.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8),
    "large": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=8),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16),  # ~0.94B with a 32k vocab
}


def llama_config(size: str = "tiny", vocab_size: int = 512, max_position_embeddings: int = 256, **overrides):
    """A LlamaConfig of one of SIZES (intermediate = ceil(H * 2.6875 / 8) * 8, untied embeddings)."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    dims = dict(SIZES[size])
    dims.update(overrides)
    h = dims["hidden_size"]
    dims.setdefault("intermediate_size", math.ceil(h * 2.6875 / 8) * 8)
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    dims.setdefault("pad_token_id", 0)
    dims.setdefault("bos_token_id", 1)
    dims.setdefault("eos_token_id", 2)
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **dims,
    )


def build_llama(size: str = "tiny", seed: int = 0, vocab_size: int = 512, **overrides):
    """A randomly initialised LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    config = llama_config(size, vocab_size=vocab_size, **overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a PreTrainedTokenizerFast.

    Ids 0..3 are <pad>, <s>, </s>, <unk> (matching `llama_config`). Deterministic for the
    same texts. BOS is prepended on encoding, EOS is not (PPO prompts are open-ended).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "left"  # generation pads on the left
    fast.model_max_length = 256
    return fast


def build_tiny(out_dir: str | Path, texts: Iterable[str] | None = None, size: str = "tiny", seed: int = 0,
               vocab_size: int = 512, **overrides) -> Path:
    """Write a model + tokenizer folder loadable by `AutoModelForCausalLM/AutoTokenizer.from_pretrained`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if texts is None:
        from marl_ray.data.domain import corpus

        texts = corpus(2000, seed=seed)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    model = build_llama(size, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
