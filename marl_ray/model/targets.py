"""Which modules of a base a LoRA adapter wraps: the defaults per architecture, and a check that
refuses a name matching nothing, naming the module names the base has.

Two defaults, each keeping on every architecture the meaning it has on Llama:

| adapter                          | `target_modules` default                                        |
| -------------------------------- | --------------------------------------------------------------- |
| policy (PPO stage), SFT `lora`   | null = the attention's query and value projections, per          |
|                                  | architecture (`QUERY_VALUE`): q_proj, v_proj on Llama, Mistral,  |
|                                  | Qwen2/3, Gemma 2/3; the fused qkv_proj on Phi-3; c_attn (fused,  |
|                                  | Conv1D) on GPT-2; all-linear for an architecture not in the table |
| reward adapter (reward stage)    | all-linear = peft's shorthand for every linear (and Conv1D)      |
|                                  | layer but the output head                                        |

A name matches a module whose dotted path is that name or ends with "." + name (peft's rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from marl_ray.model.adapter_io import AdapterError

ALL_LINEAR = "all-linear"

#: model_type -> the modules that hold the attention's query and value projections. peft's own table
#: (used where a model_type is missing here) has no entry for phi3; an architecture in neither
#: gets all-linear.
QUERY_VALUE = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "phi3": ("qkv_proj",), "gpt2": ("c_attn",),
}


class TargetModulesError(AdapterError):
    """A `target_modules` entry matches no module of the base."""


def model_type(model_or_config) -> str:
    cfg = getattr(model_or_config, "config", model_or_config)
    return str(getattr(cfg, "model_type", "") or "")


def default_targets(model_type_: str) -> tuple[str, ...] | str:
    """The policy default (null) for a model_type: its query and value projections, else all-linear."""
    if model_type_ in QUERY_VALUE:
        return QUERY_VALUE[model_type_]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    return tuple(PEFT_TABLE[model_type_]) if PEFT_TABLE.get(model_type_) else ALL_LINEAR


def is_all_linear(targets) -> bool:
    if isinstance(targets, str):
        return targets.lower() == ALL_LINEAR
    items = list(targets or ())  # a list, a tuple, or the set peft's LoraConfig makes of a list
    return len(items) == 1 and str(items[0]).lower() == ALL_LINEAR


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D  # bitsandbytes' Linear8bitLt and Linear4bit are nn.Linear too


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted name -> module as the base has them, a LoRA-wrapped layer under its own name (peft's
    lora_A/lora_B/base_layer inside it left out)."""
    import sys

    # Without peft imported no module is a peft layer: checking a config before anything is loaded does not
    # import peft (and bitsandbytes with it, which has things to say on a CPU)
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if tuners is not None and isinstance(module, tuners.BaseTunerLayer):
            skip.append(name + ".")
            module = module.get_base_layer()
        out[name] = module
    return out


def _output_heads(model: nn.Module) -> set[int]:
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        heads.add(id(head))
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            heads.add(id(getattr(model, name)))
    return heads


def linear_names(model: nn.Module) -> list[str]:
    """The leaf names of the base's linear (and Conv1D) layers, output head left out, sorted."""
    types, heads = _linear_types(), _output_heads(model)
    return sorted({n.rsplit(".", 1)[-1] for n, m in _modules(model).items()
                   if n and isinstance(m, types) and id(m) not in heads})


def unmatched(targets: Sequence[str] | str, model: nn.Module) -> list[str]:
    """The entries of `targets` that match no linear, Conv1D or embedding layer of `model` (a string is
    one regular expression that must match a whole dotted name, as peft reads it)."""
    import re

    types = _linear_types() + (nn.Embedding,)
    names = [n for n, m in _modules(model).items() if n and isinstance(m, types)]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check(targets, model: nn.Module, field: str = "target_modules") -> None:
    """Raise TargetModulesError when an entry of `targets` (a list of names; all-linear and null always
    match) matches nothing in `model`, naming the linear layers the base has."""
    if targets is None or is_all_linear(targets):
        return
    missing = unmatched(targets if isinstance(targets, str) else sorted(targets), model)
    if missing:
        kind = model_type(model) or type(model).__name__
        raise TargetModulesError(
            f"{field}: {', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no module of "
            f"this base ({kind}); its linear layers are named {', '.join(linear_names(model))} "
            f"(or use {ALL_LINEAR}, or null for the architecture's default)")


def resolve(targets, model: nn.Module, field: str = "target_modules") -> list[str] | str:
    """What to give peft's LoraConfig(target_modules=...) for `model`: null -> the architecture's
    default (`default_targets`), [all-linear] -> "all-linear", a list -> itself, checked."""
    if targets is None:
        targets = default_targets(model_type(model))
    if is_all_linear(targets):
        return ALL_LINEAR
    targets = targets if isinstance(targets, str) else list(targets)  # a string: a regular expression
    check(targets, model, field)
    return targets


def conv1d_only(targets, model: nn.Module) -> bool:
    """Whether every module `targets` (a resolved list, or all-linear) wraps is a Conv1D (GPT-2): peft's
    LoRA then needs fan_in_fan_out=True (it sets it itself, with a warning per layer, when not told)."""
    from transformers.pytorch_utils import Conv1D

    mods = _modules(model)
    heads = _output_heads(model)
    if is_all_linear(targets):
        hit = [m for n, m in mods.items() if n and isinstance(m, _linear_types()) and id(m) not in heads]
    elif isinstance(targets, str):
        import re

        hit = [m for n, m in mods.items() if n and re.fullmatch(targets, n)]
    else:
        hit = [m for n, m in mods.items() if n and any(n == t or n.endswith("." + t) for t in targets)]
    return bool(hit) and all(isinstance(m, Conv1D) for m in hit)


def skeleton(name_or_path: str) -> nn.Module | None:
    """The causal LM of a local model folder with no weights (meta device), for checking names before
    anything is loaded; None where that cannot be built (not a local folder, remote code, ...). A .gguf
    file is read from its dequantized folder."""
    from marl_ray.model.gguf import is_gguf, resolve_base

    if is_gguf(name_or_path) and Path(name_or_path).expanduser().is_file():
        name_or_path = resolve_base(name_or_path)
    if not Path(name_or_path).expanduser().is_dir():
        return None
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()))
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
    except Exception:  # an unknown architecture: the check happens where the base is loaded
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def check_base(name_or_path: str, targets, field: str = "target_modules") -> None:
    """`check` against the module names of a local base folder, without loading its weights (a no-op
    for a hub id or an architecture transformers cannot build from its config)."""
    if targets is None or is_all_linear(targets):
        return
    model = skeleton(name_or_path)
    if model is not None:
        check(targets, model, field)
