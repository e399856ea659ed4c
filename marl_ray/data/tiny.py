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
#: The turn tokens of `build_tokenizer(chat=True)` and its ChatML template (the layout of Qwen2's).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

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


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat: bool = False):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a PreTrainedTokenizerFast.

    Ids 0..3 are <pad>, <s>, </s>, <unk> (matching `llama_config`). Deterministic for the
    same texts. BOS is prepended on encoding, EOS is not (PPO prompts are open-ended).
    chat=True adds the ChatML turn tokens <|im_start|> and <|im_end|> (ids 4 and 5) and a ChatML
    chat template (CHATML_TEMPLATE, as Qwen2's): a tokenizer for conversational data.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    if chat:
        specials += list(CHAT_TOKENS)
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
    if chat:
        fast.chat_template = CHATML_TEMPLATE
        fast.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    return fast


def build_tiny(out_dir: str | Path, texts: Iterable[str] | None = None, size: str = "tiny", seed: int = 0,
               vocab_size: int = 512, arch: str = "llama", chat: bool = False, **overrides) -> Path:
    """Write a model + tokenizer folder loadable by `AutoModelForCausalLM/AutoTokenizer.from_pretrained`.

    arch: one of ARCHITECTURES (the layout of that family, see `arch_config`); llama by default.
    chat: the tokenizer has ChatML turn tokens and a chat template (`build_tokenizer(chat=True)`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if texts is None:
        from marl_ray.data.domain import corpus

        texts = corpus(2000, seed=seed)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, chat=chat)
    if arch == "llama":
        model = build_llama(size, seed=seed, vocab_size=len(tokenizer), **overrides)
    else:
        model = build_model(arch, size, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------- other architectures

#: The architectures `build_model` builds: each family's own layout at the sizes of SIZES (random
#: weights, seeded), for the tests that every stage works on each.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2")


def arch_config(arch: str, size: str = "tiny", vocab_size: int = 512, max_position_embeddings: int = 256,
                **overrides):
    """The transformers config of `arch` (one of ARCHITECTURES) at one of SIZES, special token ids 0..2
    as `build_tokenizer` makes them. What each family brings that Llama has not:

    | arch    | what is different                                                                  |
    | ------- | ---------------------------------------------------------------------------------- |
    | qwen2   | biases on q/k/v; grouped-query attention (2 query heads per KV head)                |
    | qwen3   | RMSNorm on q and k per head; tied input/output embeddings                          |
    | mistral | grouped-query attention, a sliding window                                          |
    | gemma2  | embeddings scaled by sqrt(H), tied; soft-capped attention and final logits (caps    |
    |         | small enough to bite on random weights: 10 and 2); sliding-window layers; 4 norms   |
    | gemma3  | Gemma 2's layout with q/k norms instead of attention soft-capping, no logit cap     |
    | phi3    | fused qkv_proj and gate_up_proj                                                    |
    | gpt2    | Conv1D layers (c_attn, c_proj, c_fc), learned positions, LayerNorm, n_embd, tied     |
    """
    import transformers

    if arch == "llama":
        return llama_config(size, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                            **overrides)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    dims = dict(SIZES[size])
    h, n, layers = dims["hidden_size"], dims["num_attention_heads"], dims["num_hidden_layers"]
    head_dim = h // n
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=h, n_layer=layers, n_head=n, n_positions=max_position_embeddings,
                  tie_word_embeddings=True, **ids)
        kw.update(overrides)
        return transformers.GPT2Config(**kw)
    common = dict(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=layers, num_attention_heads=n,
                  num_key_value_heads=max(1, n // 2), intermediate_size=math.ceil(h * 2.6875 / 8) * 8,
                  max_position_embeddings=max_position_embeddings, **ids)
    if arch == "qwen2":
        kw = dict(common, tie_word_embeddings=False)
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        kw = dict(common, head_dim=head_dim, tie_word_embeddings=True)
        cls = transformers.Qwen3Config
    elif arch == "mistral":
        kw = dict(common, head_dim=head_dim, sliding_window=16, tie_word_embeddings=False)
        cls = transformers.MistralConfig
    elif arch == "gemma2":
        kw = dict(common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                  attn_logit_softcapping=10.0, final_logit_softcapping=2.0, tie_word_embeddings=True)
        cls = transformers.Gemma2Config
    elif arch == "gemma3":
        kw = dict(common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                  layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
                  tie_word_embeddings=True)
        cls = transformers.Gemma3TextConfig
    else:  # phi3
        kw = dict(common, original_max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
        cls = transformers.Phi3Config
    kw.update(overrides)
    return cls(**kw)


def build_model(arch: str = "llama", size: str = "tiny", seed: int = 0, vocab_size: int = 512, **overrides):
    """A randomly initialised causal LM of `arch` (see `arch_config`); the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    if arch == "llama":
        return build_llama(size, seed=seed, vocab_size=vocab_size, **overrides)
    config = arch_config(arch, size, vocab_size=vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(config, k))
    return model.eval()
