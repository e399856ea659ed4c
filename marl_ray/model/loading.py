"""Loading the shared base: once, frozen, in eval mode, optionally 4-bit or 8-bit with bitsandbytes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

def quantization_config(quantization, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig for "8bit"/"4bit" (nf4), None for "none"; checks bitsandbytes can serve it."""
    if quantization is None or quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        cfg = quantization
    elif quantization == "8bit":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "4bit":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)} "
                         "(or a transformers.BitsAndBytesConfig)")
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        raise ValueError("the BitsAndBytesConfig asks for neither load_in_4bit nor load_in_8bit")
    if cfg.load_in_4bit and cfg.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type {cfg.bnb_4bit_quant_type!r} cannot be served: use 'nf4' or 'fp4'")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not installed, or no backend for this platform
        raise ValueError(f"{'4' if cfg.load_in_4bit else '8'}-bit quantization needs bitsandbytes, "
                         f"which cannot be imported here ({e}): `pip install bitsandbytes` or use quantization='none'") from e
    return cfg



def load_base(name_or_path: str, quantization="none", dtype="fp32", device_map=None, low_memory: bool = False):
    """Load a causal LM (a folder, hub id or .gguf file) once, frozen and in eval mode, optionally quantized.

    low_memory: a base whose weights are converted (quantized, or cast to another dtype) is read
    tensor by tensor, and a quantized one leaves glibc returning large freed blocks to the OS for
    the rest of the process (`tweaks.streamed_checkpoint_reads`): process-wide settings, so only a
    process that owns its memory (a model host) asks for them."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from marl_ray.model import tweaks
    from marl_ray.model.gguf import resolve_base

    name_or_path = resolve_base(name_or_path)  # a .gguf file: its dequantized folder (converted once)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    qcfg = quantization_config(quantization, torch_dtype)
    kwargs = {"dtype": torch_dtype}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}  # a host owns its node's (or its Ray-assigned) GPU
    if device_map is not None:
        kwargs["device_map"] = device_map
    converted = qcfg is not None or checkpoint_dtype(name_or_path) not in (None, torch_dtype)
    streamed = tweaks.streamed_checkpoint_reads(keep_large_blocks_mapped=qcfg is not None) \
        if low_memory and converted else contextlib.nullcontext()
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with streamed:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load base model {name_or_path!r}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    keep_4bit_layout(model)
    return model.eval()


def checkpoint_dtype(name_or_path: str):
    """The dtype a local checkpoint's config names (None when unknown)."""
    cfg = Path(name_or_path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def keep_4bit_layout(model: nn.Module):
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    bitsandbytes (>= 0.48) rewrites a Linear4bit's weight in place into a CPU-only layout the
    first time it runs in eval mode without autograd (e.g. during generation). That crashes
    for out_features not divisible by 32 (Llama's MLP at H=64/256: 176, 688) and leaves later
    training passes on a different weight layout; one layout for every pass is what we test.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

