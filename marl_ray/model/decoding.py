"""A lean forward of Hugging Face Llama bases (and Qwen2, Qwen3, Mistral: see FAMILIES), and a
sampling loop on it.

`transformers`' own forward spends most of a decode step on per-call machinery (decorators,
keyword plumbing, a cache object, a new attention mask each step, `generate`'s bookkeeping)
rather than on arithmetic: with a small base on a CPU that is several times the matrix work.
`LeanLlama` runs the same tensor operations in the same order as `LlamaModel` with sdpa
attention (it calls the model's own norm, rotary, activation and attention functions, and every
linear layer as a module, so peft's LoRA layers, mixed-adapter batches included, and
bitsandbytes layers compute what they compute in HF's forward), with a pre-allocated KV cache.
`sample` is HF `generate`'s sampling loop (same logits processors, softmax + multinomial or
argmax, EOS then padding, early stop when every row has ended), so under the same seed it
draws the same tokens whenever the logits agree bit for bit (they do in the tests).

`LeanLlama.hidden` runs the scoring and training passes over whole sequences on the same layer
loop, tuned for them: on a CPU, eager attention up to EAGER_MAX_LEN tokens; the last layer only on
the positions that are read; plain peft LoRA layers computed here (`_project`), in the
activations' dtype.

Anything this does not know (another architecture, another attention implementation, a
generation config with extra logits processors) is left to HF: see `supports` and
`generation_config_is_plain`; the caller then uses `generate`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from marl_ray.algorithms.ppo import entropy_from_logits, logprobs_from_logits

# Generation-config fields that `sample` handles (or overrides, or that change no token): any
# other field set to a non-neutral value sends generation back to HF `generate`.
_IGNORED = {
    "_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "decoder_start_token_id", "use_cache", "do_sample", "temperature", "top_k", "top_p", "max_length",
    "max_new_tokens", "min_new_tokens", "cache_implementation", "cache_config", "compile_config",
    "disable_compile", "low_memory", "length_penalty", "early_stopping", "max_cache_len",
}
_NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "min_length": 0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1,
    "num_beam_groups": 1, "num_return_sequences": 1, "diversity_penalty": 0.0, "guidance_scale": 1.0,
    "remove_invalid_values": False, "renormalize_logits": False, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "is_assistant": False,
}


def generation_config_is_plain(gcfg) -> bool:
    """True when `gcfg` asks for nothing beyond what `sample` does (no penalties, no forced or
    suppressed tokens, no beams...)."""
    for k, v in vars(gcfg).items():
        if v is None or k in _IGNORED or k.startswith("_"):
            continue
        if k in _NEUTRAL and v == _NEUTRAL[k]:
            continue
        if isinstance(v, dict) and not v:
            continue
        return False
    return True


# The families the lean loop serves: Llama's decoder layer, and what each adds to it.
#   llama    -
#   qwen2    biases on q/k/v: the linear layers carry them (nothing to do here)
#   qwen3    RMSNorm on q and k per head, before the rotary embedding (`attn.q_norm`, `attn.k_norm`)
#   mistral  a sliding window (config.sliding_window, when set): keys more than `window` cache
#            slots back are masked (`LeanLlama.window`); at lengths within the window it changes nothing
# Qwen2/Qwen3 with sliding-window layers (use_sliding_window), and every other family, go to HF.
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def _family(base: nn.Module):
    """(family key, its modeling module) of a causal LM of one of FAMILIES, else None."""
    import importlib

    for key, prefix in FAMILIES.items():
        if type(base).__name__ == f"{prefix}ForCausalLM":
            try:
                mod = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
            except ImportError:  # pragma: no cover
                return None
            return (key, mod) if type(base) is getattr(mod, f"{prefix}ForCausalLM") else None
    return None


def supports(base: nn.Module) -> bool:
    """A plain HF causal LM of one of FAMILIES (sdpa attention, no hooks on the layer modules)."""
    fam = _family(base)
    if fam is None:
        return False
    key, mod = fam
    prefix = FAMILIES[key]
    if not isinstance(getattr(base, "model", None), getattr(mod, f"{prefix}Model")):
        return False
    cfg = base.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if key in ("qwen2", "qwen3") and any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    model = base.model
    modules = [model, model.norm, model.embed_tokens, model.rotary_emb, base.lm_head]
    layer_t, attn_t, mlp_t = (getattr(mod, f"{prefix}{n}") for n in ("DecoderLayer", "Attention", "MLP"))
    for layer in model.layers:
        if type(layer) is not layer_t or type(layer.self_attn) is not attn_t or type(layer.mlp) is not mlp_t:
            return False
        modules += [layer, layer.self_attn, layer.mlp]
    # Hooks on the modules whose forward this skips would be skipped too (the linear layers,
    # norms and activations it calls as modules keep theirs).
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# Whole-sequence passes on a CPU use eager attention up to this length (see LeanLlama.hidden).
EAGER_MAX_LEN = 256


class LeanLlama:
    """The decoder of a base of one of FAMILIES as a plain loop over its layers (see the module
    docstring): Llama's layer, with q/k norms where the attention has them (Qwen3) and a sliding
    window where the config sets one (Mistral)."""

    def __init__(self, base: nn.Module):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        _, mod = _family(base)
        self.base = base
        self.model = base.model
        self.config = base.config
        self.layers = list(self.model.layers)
        self.head_dim = self.layers[0].self_attn.head_dim
        # Mistral: every layer's keys more than `window` slots back are masked (None: no window)
        self.window = getattr(self.config, "sliding_window", None) if type(base).__name__.startswith("Mistral") else None
        self._sdpa = sdpa_attention_forward
        self._eager = mod.eager_attention_forward
        self._rope = mod.apply_rotary_pos_emb
        self._causal_mask = create_causal_mask if self.window is None else create_sliding_window_causal_mask
        # transformers 5.20 renamed create_causal_mask's past_key_values to cache
        params = inspect.signature(create_causal_mask).parameters
        self._mask_cache_kw = "cache" if "cache" in params else "past_key_values"

    def rotary(self, like: torch.Tensor, position_ids_BT: torch.Tensor):
        return self.model.rotary_emb(like, position_ids=position_ids_BT)

    def prefill_mask(self, embeds_BTH: torch.Tensor, attention_mask_BT: torch.Tensor, position_ids_BT):
        """HF's sdpa mask for a pass over whole sequences (None where sdpa runs causal itself)."""
        return self._causal_mask(config=self.config, inputs_embeds=embeds_BTH, attention_mask=attention_mask_BT,
                                 position_ids=position_ids_BT, **{self._mask_cache_kw: None})

    def forward(self, embeds_BTH, cos, sin, mask, cache: "KVCache | None" = None, start: int = 0,
                attention=None, lora_rows=None) -> torch.Tensor:
        """Final (normed) hidden states (B, T, H) of tokens (embedded) at cache slots [start, start + T).

        `cos, sin`: the rotary tables of these tokens' positions; `mask`: the attention function's
        (sdpa: HF's bool mask (B, 1, T, start + T) or None for plain causal attention; eager: an
        additive one); `cache`: a KVCache or None; `attention`: sdpa (default) or eager;
        `lora_rows`: as in `hidden`, None to call every linear layer as a module.
        """
        h = embeds_BTH
        for i in range(len(self.layers)):
            h = self._layer(i, h, cos, sin, mask, attention or self._sdpa, cache, start, lora_rows=lora_rows)
        return self.model.norm(h)

    def hidden(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, position_ids_BT: torch.Tensor,
               keep_from: int = 0, checkpoint: bool = False,
               lora_rows: "list[tuple[str | None, int, int]] | None" = None) -> torch.Tensor:
        """Final (normed) hidden states (B, T - keep_from, H) of a pass over whole sequences.

        For scoring and training passes. The last layer computes only positions >= `keep_from`
        (all positions' keys and values still enter attention): nothing reads the rest.
        `checkpoint`: recompute each layer in the backward pass instead of keeping its activations.
        `lora_rows`: (peft adapter name or None for none, first row, end row) for consecutive row
        ranges covering the batch; plain peft LoRA linear layers then compute their adapters here
        (see `_project`) instead of through peft's forward and its adapter routing.
        Attention: on a CPU, for sequences up to EAGER_MAX_LEN, HF's eager attention (scores by
        matmul, softmax in fp32), which runs forward and backward 1.3-4x faster there than sdpa
        (most in bf16); otherwise sdpa, whose memory does not grow with T^2.
        """
        B, T = input_ids_BT.shape
        h = self.model.embed_tokens(input_ids_BT)
        cos, sin = self.rotary(h, position_ids_BT)
        if h.device.type == "cpu" and T <= EAGER_MAX_LEN:
            attention, mask = self._eager, additive_mask(_keep_mask(attention_mask_BT, self.window), h.dtype)
        else:
            attention, mask = self._sdpa, _keep_mask(attention_mask_BT, self.window)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            args = (i, h, cos, sin, mask, attention, None, 0, keep_from if i == last else 0, lora_rows)
            if checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint as run_checkpointed

                h = run_checkpointed(self._layer, *args, use_reentrant=False)
            else:
                h = self._layer(*args)
        return self.model.norm(h)

    def _layer(self, i: int, h, cos, sin, mask, attention, cache: "KVCache | None", start: int,
               q_from: int = 0, lora_rows=None) -> torch.Tensor:
        """Decoder layer i on h (B, T, H): LlamaDecoderLayer's operations, in its order. With q_from > 0
        only positions >= q_from are computed (all T positions' keys and values are): (B, T - q_from, H).
        `lora_rows`: see `hidden`; with a cache (decoding: a few rows a step) the LoRA products run
        in the adapters' dtype."""
        layer = self.layers[i]
        proj = (lambda module, x: module(x)) if lora_rows is None else (
            lambda module, x: _project(module, x, lora_rows, in_adapter_dtype=cache is not None))
        attn = layer.self_attn
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3

        def heads(y, norm):  # (B, t, heads * head_dim) -> (B, heads, t, head_dim), normed per head
            y = y.view(B, y.shape[1], -1, self.head_dim)
            return (y if norm is None else norm(y)).transpose(1, 2)

        B, T = h.shape[:2]
        x = layer.input_layernorm(h)
        k = heads(proj(attn.k_proj, x), k_norm)
        v = heads(proj(attn.v_proj, x), None)
        if q_from:
            # contiguous: a linear layer on a strided 3-D slice runs as a batched product over a
            # copy of its weight per row (2-4x slower than one folded product)
            h, x, mask = h[:, q_from:], x[:, q_from:].contiguous(), mask[:, :, q_from:]
            q = heads(proj(attn.q_proj, x), q_norm)
            q, _ = self._rope(q, q, cos[:, q_from:], sin[:, q_from:])
            _, k = self._rope(k, k, cos, sin)
        else:
            q = heads(proj(attn.q_proj, x), q_norm)
            q, k = self._rope(q, k, cos, sin)
        end = start + T
        if cache is not None:
            kc, vc = cache.buffers(i, k)
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            k, v = kc[:, :, :end], vc[:, :, :end]
        o, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        o = o.reshape(B, q.shape[2], -1).contiguous()
        h = h + proj(attn.o_proj, o)
        x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        return h + proj(mlp.down_proj, mlp.act_fn(proj(mlp.gate_proj, x)) * proj(mlp.up_proj, x))


def _in_fp32(attention):
    """`attention` (HF's eager or sdpa function) run in fp32, q, k, v and an additive mask up-cast,
    the output in q's dtype: for decoding a bf16/fp16 base on a CPU, where one query's products
    over a half-precision cache run 2-3x slower than in fp32 (one batch's cache is small)."""
    def run(module, q, k, v, mask, **kw):
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        o, w = attention(module, q.float(), k.float(), v.float(), mask, **kw)
        return o.to(q.dtype), w
    return run


def _keep_mask(attention_mask_BT: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and not padding, and within `window` slots back where one is set
    (HF's sliding window: key j is seen from query i when i - window < j); a query always sees
    itself (a left-pad query, which sees no real key, stays finite)."""
    T = attention_mask_BT.shape[1]
    dev = attention_mask_BT.device
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    if window is not None:
        causal_TT = causal_TT.triu(1 - window)
    keep = (causal_TT & attention_mask_BT.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
    return keep[:, None]


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """HF's eager mask: 0 where attended, the dtype's lowest value elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def _plain_lora(module: nn.Module) -> bool:
    """A peft LoRA Linear over a plain nn.Linear, unmerged, adapters not disabled, with no LoRA
    variant (DoRA...) and no active dropout: what `_project` computes itself."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(module, LoraLinear) or type(module.base_layer) is not nn.Linear or module.merged:
        return False
    if module.disable_adapters:  # inside peft's disable_adapter(): peft's forward gives the base's output
        return False
    if getattr(module, "lora_variant", None) or any(getattr(module, "use_dora", {}).values()):
        return False
    return not (module.training and any(not isinstance(d, nn.Identity) for d in module.lora_dropout.values()))


def _project(module: nn.Module, x: torch.Tensor, lora_rows, in_adapter_dtype: bool = False) -> torch.Tensor:
    """module(x), with a plain peft LoRA layer's adapters applied here, row range by row range.

    The adapter product runs in x's dtype: peft would copy the activations to the adapters' fp32
    and back at every LoRA layer of a bf16 base (in fp32 the operations and their order are peft's,
    so the result is the same bit for bit). `in_adapter_dtype`: in the adapters' dtype, as peft
    does, which is faster for a few rows (a decode step: a bf16 product of 16 rows by rank 16 costs
    more there than the copies). Anything else is called as a module.
    """
    if not _plain_lora(module):
        return module(x)
    y = module.base_layer(x)
    parts = []
    for name, lo, hi in lora_rows:
        part = y if len(lora_rows) == 1 else y[lo:hi]
        if name is not None and name in module.lora_A:
            xs = x if len(lora_rows) == 1 else x[lo:hi]
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            if in_adapter_dtype:
                xs = xs.to(a.dtype)
            else:
                a, b = a.to(x.dtype), b.to(x.dtype)
            part = part + (F.linear(F.linear(xs, a), b) * module.scaling[name]).to(y.dtype)
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class KVCache:
    """Pre-allocated keys/values of every layer, (B, kv_heads, length, head_dim) each, allocated at
    the first write in `dtype`, or in the dtype the layer produces."""

    def __init__(self, length: int, dtype: torch.dtype | None = None):
        self.length = length
        self.dtype = dtype
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def buffers(self, i: int, k: torch.Tensor):
        if i == len(self.layers):
            B, n_kv, _, hd = k.shape
            self.layers.append(tuple(torch.empty(B, n_kv, self.length, hd, dtype=self.dtype or k.dtype,
                                                 device=k.device) for _ in range(2)))
        return self.layers[i]


def _processors(prompt_len: int, min_new_tokens: int, eos: list[int] | None, do_sample: bool, temperature: float,
                top_k: int, top_p: float, device):
    """The logits processors HF `generate` builds for these settings, in its order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if eos is not None and min_new_tokens and min_new_tokens > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, eos, device=device))
    if do_sample:
        if temperature is not None and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return procs


@torch.no_grad()
def sample(lean: LeanLlama, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, *, max_new_tokens: int,
           min_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float, eos_token_id,
           pad_token_id, lora_rows=None, logits_out: "list | None" = None,
           hidden_out: "list | None" = None, scores_out: "list | None" = None) -> torch.Tensor:
    """Left-padded prompts + up to max_new_tokens sampled tokens (B, P + n), as HF `generate`.

    Runs under whatever adapter routing the caller set up. `lora_rows` (see `LeanLlama.hidden`):
    plain peft LoRA layers computed by `_project` and, on a CPU, eager attention in fp32 over an
    fp32 cache: faster, and the logits agree with HF's to rounding. None: every linear layer as a
    module and sdpa attention, HF's arithmetic exactly, so under the same seed the same tokens as
    `generate`.
    `logits_out`: a list that gets each step's logits (B, V), fp32; `hidden_out`: each step's
    final hidden state (B, H) of the position that predicts the step's token; `scores_out`: each
    step's (logprobs (B,), entropies (B,)) fp32 of the step's tokens under its logits (those of
    `logits_out` without keeping a (B, V) tensor per step).
    """
    B, P = input_ids_BP.shape
    R = max_new_tokens
    dev = input_ids_BP.device
    eos = None if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    procs = _processors(P, min_new_tokens, eos, do_sample, temperature, top_k, top_p, dev)
    eos_t = None if eos is None else torch.tensor(eos, device=dev)
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)  # HF: pad = first EOS

    # Generated positions always count as attended (HF extends the mask with ones), EOS or not.
    full_mask = torch.cat([attention_mask_BP, attention_mask_BP.new_ones(B, R)], 1)
    pos = full_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(full_mask == 0, 0)
    eager = lora_rows is not None and dev.type == "cpu"  # eager attention in fp32 (_in_fp32)
    cache = KVCache(P + R, torch.float32 if eager else None)
    out = torch.full((B, P + R), pad, dtype=input_ids_BP.dtype, device=dev)
    out[:, :P] = input_ids_BP
    unfinished = torch.ones(B, dtype=torch.long, device=dev)
    padded = not bool(full_mask.all())
    lm_head = lean.base.lm_head

    embeds = lean.model.embed_tokens(input_ids_BP)
    cos, sin = lean.rotary(embeds, pos)
    if eager and P <= EAGER_MAX_LEN:
        attention, mask = _in_fp32(lean._eager), additive_mask(_keep_mask(attention_mask_BP, lean.window),
                                                                torch.float32)
    else:  # sdpa (and so for any prefill whose scores would be large)
        attention, mask = lean._sdpa, lean.prefill_mask(embeds, attention_mask_BP, pos[:, :P])
        attention = _in_fp32(attention) if eager else attention
    step_attention = _in_fp32(lean._eager) if eager else lean._sdpa
    # each decode step's mask (B, 1, 1, keys): a slice of one built here; past a sliding window,
    # the keys before it masked too
    step_mask = None if not padded else (
        additive_mask(full_mask[:, None, None, :].bool(), torch.float32) if eager
        else full_mask[:, None, None, :].bool())

    def mask_of_step(end: int):  # the new token sits at slot end - 1 and sees keys [0, end)
        if lean.window is None or end <= lean.window:
            return None if step_mask is None else step_mask[..., :end]
        keep = full_mask[:, None, None, :end].to(torch.bool, copy=True)
        keep[..., :end - lean.window] = False
        return additive_mask(keep, torch.float32) if eager else keep
    start = 0
    for t in range(R):
        n = embeds.shape[1]
        h = lean.forward(embeds, cos[:, start:start + n], sin[:, start:start + n], mask, cache, start,
                         attention=attention, lora_rows=lora_rows)
        start += n
        # contiguous: at the prefill h[:, -1:] is strided, and a bf16 linear layer on a strided 3-D input
        # runs on CPU as a batched product over a copy of its weight per row (64 rows x a 49k-token head:
        # 3.6 GB for one step)
        logits = lm_head(h[:, -1:].contiguous())[:, -1].to(copy=True, dtype=torch.float32)
        if logits_out is not None:
            logits_out.append(logits.clone())
        if hidden_out is not None:
            hidden_out.append(h[:, -1])
        raw = logits.clone() if scores_out is not None else None  # the processors may write in place
        scores = procs(out[:, :P + t], logits)
        if do_sample:
            probs = F.softmax(scores, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        if eos_t is not None:
            nxt = nxt * unfinished + pad * (1 - unfinished)
        out[:, P + t] = nxt
        if scores_out is not None:
            scores_out.append((logprobs_from_logits(raw, nxt), entropy_from_logits(raw)))
        if eos_t is not None:
            unfinished = unfinished & ~torch.isin(nxt, eos_t)
            if unfinished.max() == 0:
                return out[:, :P + t + 1]
        embeds = lean.model.embed_tokens(nxt[:, None])
        attention = step_attention
        mask = mask_of_step(start + 1)
    return out
