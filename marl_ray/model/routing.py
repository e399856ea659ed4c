"""Which rows of a batch run under which LoRA adapter: the only module that touches peft internals.

peft wraps the frozen base once (`get_peft_model`); further adapters are added to that wrapper.
A pass over a batch names an adapter per row: one name uses peft's active-adapter route (works
with autograd), several use peft's mixed-adapter batch (eval mode), "__base__" rows run under no
adapter.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Sequence

from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def inject(peft, base: nn.Module, name: str, config):
    """Add an untrained LoRA adapter `name` to `base`; returns the PeftModel around it (made on the first call).

    The heads live outside peft (no task type, no modules_to_save): a disabled adapter is then
    exactly the base, and saving an adapter writes its LoRA weights alone."""
    from peft import get_peft_model

    config = copy.deepcopy(config)
    config.task_type = None
    config.modules_to_save = None
    config.inference_mode = False
    config.base_model_name_or_path = getattr(base, "name_or_path", None)
    with warnings.catch_warnings():
        # peft warns when a name is a substring of "lora_" (e.g. "a"): harmless for us,
        # since we copy weights in by exact parameter name.
        warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
        if peft is None:
            peft = get_peft_model(base, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
    peft.eval()
    return peft


def delete(peft, name: str):
    peft.delete_adapter(name)


def lora_parameters(peft, name: str) -> dict[str, nn.Parameter]:
    """Parameter name -> LoRA tensor of adapter `name`."""
    if peft is None:
        return {}
    keys = (f".lora_A.{name}.", f".lora_B.{name}.", f".lora_embedding_A.{name}", f".lora_embedding_B.{name}")
    return {n: p for n, p in peft.named_parameters() if any(k in n for k in keys)}


def state_dict(peft, name: str) -> dict:
    """Adapter `name`'s weights named as in a peft folder (without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(peft, adapter_name=name)


def save_config(peft, name: str, folder: str):
    peft.peft_config[name].save_pretrained(folder)


@contextlib.contextmanager
def route(peft, names: Sequence[str], on_switch=None):
    """Run the enclosed passes with row b under adapter names[b] (BASE: no adapter).

    One name: peft's active-adapter route. It stays active after the pass (every pass names its
    adapters), so the next pass under the same one switches nothing; `on_switch()` runs after a
    switch (peft's set_adapter turns requires_grad on for what it activates). Several names:
    peft's mixed-adapter batch, in eval mode (no dropout in the base)."""
    uniq = set(names)
    if peft is None:
        if uniq != {BASE}:
            raise ValueError(f"no adapters loaded, cannot run {sorted(uniq)}")
        yield
        return
    if uniq == {BASE}:
        with peft.disable_adapter():
            yield
        return
    if len(uniq) == 1:
        (name,) = uniq
        # PeftModel.active_adapter does not follow base_model.set_adapter: ask the tuner.
        if peft.base_model.active_adapter not in (name, [name]):
            peft.base_model.set_adapter(name)
            if on_switch is not None:
                on_switch()
        yield
        return
    was_training = peft.base_model.training
    peft.base_model.eval()
    try:
        with peft.base_model._enable_peft_forward_hooks(adapter_names=list(names)):
            yield
    finally:
        peft.base_model.train(was_training)
