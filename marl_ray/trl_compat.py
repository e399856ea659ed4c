"""Drop-in for TRL's `AutoModelForCausalLMWithValueHead` (TRL <= 0.11), with its multi-adapter API.

    from marl_ray import AutoModelForCausalLMWithValueHead   # was: from trl import ...
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, peft_config=lora_config, reward_adapter=rm_adapter_id,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    scores = model.compute_reward_score(**inputs)                        # (B, T, num_labels)
    scores = model.compute_reward_score(**inputs, ppo_adapter_name="policy_1")

Two kinds of model, as in TRL:
- peft (a `peft_config`, a policy folder, or a `PeftModel` instance): the base is frozen inside
  `pretrained_model` (a `PeftModel`); every LoRA adapter peft knows, other than the reward
  adapter, is a policy with its own value head. peft's API on `model.pretrained_model`
  (`add_adapter`, `set_adapter`, `delete_adapter`, `active_adapter`) is the source of truth for
  which adapters exist and which one is active; the registry (`self.model`) follows it.
- full (none of these): `v_head` on the base, every weight trainable, like TRL's.

Fixed against TRL: `ppo_adapter_name` is honoured (TRL >= 0.7.5 swallowed it and re-activated
"default"); the score head gets a bias only if the adapter has one; `reward_scores` reads each
sequence's last real token (TRL's example read index -1, wrong for right padding); scoring runs
without autograd and leaves the reward adapter frozen and the train/eval mode as it was; a
sharded full checkpoint's value head loads from a local folder. Deliberate deviations:
docs/trl_dropin.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from marl_ray.model import MultiAdapterModel, last_token_index, load_base

log = logging.getLogger(__name__)

TRL_V_HEAD_FILE = "pytorch_model.bin"  # TRL 0.11's file for a peft model's v_head.* weights
V_HEAD_PREFIX = "v_head."
V_HEAD_ARGS = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
# prepare_model_for_kbit_training's arguments, which TRL accepts in from_pretrained
KBIT_ARGS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")


class ValueHead(nn.Module):
    """TRL's value head layout: dropout, then `summary`, a Linear(H, 1) in fp32."""

    def __init__(self, summary: nn.Linear, dropout: nn.Module):
        super().__init__()
        self.dropout = dropout
        self.summary = summary
        self.flatten = nn.Flatten()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.summary.weight
        return self.summary(self.dropout(hidden_states).to(device=w.device, dtype=w.dtype))


def _is_adapter_folder(src) -> bool:
    return isinstance(src, (str, Path)) and (Path(src) / "adapter_config.json").is_file()


def _read_v_head(folder: Path) -> dict[str, torch.Tensor] | None:
    """The `v_head.*` weights of a checkpoint folder in TRL's layout (beside peft weights in
    pytorch_model.bin, or inside a full model's safetensors/bin files, sharded or not), keyed
    without the prefix; None where the folder has none."""
    from safetensors import safe_open

    files: list[Path] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            files += sorted({folder / f for k, f in weight_map.items() if k.startswith(V_HEAD_PREFIX)})
    files += [folder / f for f in ("model.safetensors", TRL_V_HEAD_FILE) if (folder / f).is_file()]
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                state = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(V_HEAD_PREFIX)}
        else:
            state = {k: v for k, v in torch.load(f, map_location="cpu", weights_only=True).items()
                     if k.startswith(V_HEAD_PREFIX)}
        if state:
            return {k[len(V_HEAD_PREFIX):].replace("summary.", ""): v for k, v in state.items()}
    return None


def _has_lm_head(model: nn.Module) -> bool:
    if any(hasattr(model, n) for n in AutoModelForCausalLMWithValueHead.lm_head_namings):
        return True
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def _load_causal_lm(src, model_args, quantization, dtype, device_map, extra: dict):
    """The base, loaded like `load_base` (frozen, eval); extra transformers arguments pass through."""
    if not model_args and not extra:
        return load_base(str(src), quantization, dtype, device_map)
    from marl_ray.model.loading import DTYPES, keep_4bit_layout, quantization_config

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    kwargs = dict(extra, dtype=torch_dtype)
    qcfg = quantization_config(quantization, torch_dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(src), *model_args, **kwargs)
    model.requires_grad_(False)
    keep_4bit_layout(model)
    return model.eval()


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM with a value head; with peft: named LoRA policies (each with its own value head)
    and a reward adapter with a score head on the one base."""

    transformers_parent_class = AutoModelForCausalLM
    lm_head_namings = ("lm_head", "embed_out")
    supported_args = V_HEAD_ARGS

    def __init__(self, pretrained_model, _fresh_heads=(), **kwargs):
        """`pretrained_model`: a MultiAdapterModel, a `PeftModel` (its adapters become policies) or a
        causal LM (a full value-head model). kwargs: the value head's `summary_dropout_prob`,
        `v_head_init_strategy` (None: nn.Linear's random init; "normal") and `v_head_initializer_range`."""
        super().__init__()
        unknown = sorted(set(kwargs) - set(V_HEAD_ARGS))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the value head takes {list(V_HEAD_ARGS)}")
        self._init_strategy = kwargs.get("v_head_init_strategy")
        if self._init_strategy not in (None, "normal"):
            raise ValueError(f"v_head_init_strategy={self._init_strategy!r}: use None (random) or 'normal'")
        self._init_range = kwargs.get("v_head_initializer_range", 0.2)
        model = self._registry_for(pretrained_model)
        config = model.base.config
        p = getattr(config, "summary_dropout_prob", None)  # as in TRL, the model config's value wins
        if p is None:
            p = kwargs.get("summary_dropout_prob")
            p = 0.1 if p is None else p
        # TRL's parameter names come first: pretrained_model.* (the base, with the LoRA adapters
        # inside it when peft) and v_head.summary.* (the active policy's value head); then the
        # registry's other heads (model.value_heads.<policy>.*, model.score_heads.<reward>.*).
        self._modules["pretrained_model"] = model.peft if model.peft is not None else model.base
        self._modules["v_head"] = None
        self.model = model
        self.v_head_dropout = nn.Dropout(p) if p else nn.Identity()
        self.__dict__["_views"] = {}  # policy -> ValueHead view over its registry head
        self.config = config
        self.is_loaded_in_8bit = model.quantization == "8bit"
        self.is_loaded_in_4bit = model.quantization == "4bit"
        self.is_sequential_parallel = False
        self.current_device = model.device
        rewards = model.rewards
        self.supports_rm_adapter = bool(rewards)
        self.rm_adapter_name = rewards[0] if rewards else None
        if model.peft is None:  # the full value-head model: v_head on the base, everything trains
            for param in model.base.parameters():
                if param.is_floating_point():
                    param.requires_grad_(True)
            self._modules["v_head"] = ValueHead(self._init_head(model._new_value_head()), self.v_head_dropout)
        else:
            for name in _fresh_heads:
                self._init_head(model.value_heads[name])
            self.sync_with_peft()

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _registry_for(pretrained_model) -> MultiAdapterModel:
        if isinstance(pretrained_model, MultiAdapterModel):
            return pretrained_model
        from peft import PeftModel

        if isinstance(pretrained_model, PeftModel):
            for cfg in pretrained_model.peft_config.values():
                if cfg.is_prompt_learning:
                    raise ValueError("prompt-learning peft configs are not supported for PPO training: use LoRA")
            base = pretrained_model.get_base_model()
            if not _has_lm_head(base):
                raise ValueError("the model has no language model head (lm_head): pass a causal LM, e.g. one "
                                 "loaded with AutoModelForCausalLM")
            model = MultiAdapterModel(base)
            model.peft = pretrained_model
            return model
        if not isinstance(pretrained_model, nn.Module):
            raise ValueError("pretrained_model should be a path, a hub id, a transformers causal LM or a PeftModel, "
                             f"not {type(pretrained_model).__name__}")
        if not _has_lm_head(pretrained_model):
            raise ValueError("the model has no language model head (lm_head): pass a causal LM, e.g. one loaded with "
                             "AutoModelForCausalLM, not the bare decoder")
        return MultiAdapterModel(pretrained_model)

    def _init_head(self, head: nn.Linear) -> nn.Linear:
        """TRL's value-head init: nn.Linear's own (random weight and bias) or normal(0, range) + zero bias."""
        with torch.no_grad():
            if self._init_strategy == "normal":
                head.weight.normal_(mean=0.0, std=self._init_range)
                head.bias.zero_()
            else:
                head.reset_parameters()
        return head

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, peft_config=None, reward_adapter=None,
                        reward_adapter_name: str = "reward_adapter", is_trainable: bool = False,
                        quantization_config=None, adapter_name: str = "default", torch_dtype=None, dtype=None,
                        device_map=None, **kwargs):
        """As TRL's: a base (path, hub id, causal LM or PeftModel instance) plus a new policy from
        `peft_config`, or a folder written by `save_pretrained` (peft: policy + v_head; full: weights
        + v_head), and a reward adapter (peft models only). Other keyword arguments go to the value
        head (`summary_dropout_prob`, `v_head_init_strategy`, `v_head_initializer_range`) or to
        transformers' `from_pretrained` (`load_in_8bit`/`load_in_4bit` become the quantization).
        `is_trainable` is accepted: a loaded policy is always trainable here."""
        from peft import LoraConfig, PeftConfig, PeftModel

        v_head_kwargs = {k: kwargs.pop(k) for k in V_HEAD_ARGS if k in kwargs}
        for k in KBIT_ARGS:  # peft's prepare_model_for_kbit_training is not used (see docs/trl_dropin.md)
            kwargs.pop(k, None)
        quantization = quantization_config or "none"
        if kwargs.pop("load_in_8bit", False) and quantization == "none":
            quantization = "8bit"
        if kwargs.pop("load_in_4bit", False) and quantization == "none":
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True)
        dtype = dtype or torch_dtype or "fp32"
        if peft_config is not None and not isinstance(peft_config, PeftConfig):
            raise ValueError("peft_config should be an instance of peft.PeftConfig (e.g. peft.LoraConfig)")
        if peft_config is not None and not isinstance(peft_config, LoraConfig):
            raise ValueError(f"peft_config is a {type(peft_config).__name__}: only LoRA adapters are supported "
                             "(peft.LoraConfig)")
        if reward_adapter is not None and not isinstance(reward_adapter, (str, Path)):
            raise ValueError("reward_adapter should be a local path or a hub id of a reward modelling adapter")

        src = pretrained_model_name_or_path
        folder = Path(src) if isinstance(src, (str, Path)) and Path(src).is_dir() else None
        fresh: set[str] = set()
        if _is_adapter_folder(src):  # a policy folder: ours, TRL's or a plain peft one
            if peft_config is not None:
                log.warning("peft_config ignored: %s holds a trained adapter (adapter_config.json)", src)
            base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base_name:
                raise ValueError(f"{src}/adapter_config.json names no base model (base_model_name_or_path): "
                                 "pass PeftModel.from_pretrained(base, folder) instead")
            base = _load_causal_lm(base_name, model_args, quantization, dtype, device_map, kwargs)
            model = MultiAdapterModel(base)
            fresh |= cls._load_policy_folder(model, adapter_name, folder)
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):  # save_pretrained's other policies
                if (sub / "adapter_config.json").is_file() and cls._is_our_policy(sub) and sub.name not in model.roles:
                    fresh |= cls._load_policy_folder(model, sub.name, sub)
        else:
            if isinstance(src, (str, Path)):
                base = _load_causal_lm(src, model_args, quantization, dtype, device_map, kwargs)
            elif isinstance(src, nn.Module):
                base = src
            else:
                raise ValueError("pretrained_model_name_or_path should be a path, a hub id, a transformers causal "
                                 f"LM or a PeftModel, not {type(src).__name__}")
            if isinstance(base, PeftModel) and peft_config is not None:
                log.warning("peft_config ignored: the model given is already a PeftModel")
            model = cls._registry_for(base)
            if peft_config is not None and model.peft is None:
                model.add_policy(adapter_name, peft_config)
                fresh.add(adapter_name)
        if reward_adapter is not None:
            if model.peft is None:
                raise ValueError("reward_adapter can only be used with a peft model: pass peft_config=LoraConfig(...) "
                                 "(or a PeftModel, or a policy folder) as well")
            model.add_reward(reward_adapter_name, str(reward_adapter))
        obj = cls(model, _fresh_heads=sorted(fresh), **v_head_kwargs)
        if model.peft is None and folder is not None:  # a full checkpoint: its value head, if it has one
            state = _read_v_head(folder)
            if state is not None:
                obj.v_head.summary.load_state_dict({k: v.float() for k, v in state.items()})
        return obj

    @staticmethod
    def _is_our_policy(folder: Path) -> bool:
        from marl_ray.model.adapter_io import read_meta

        return read_meta(folder).get("role") == "policy"

    @staticmethod
    def _load_policy_folder(model: MultiAdapterModel, name: str, folder: Path) -> set[str]:
        """A policy folder (ours: value_head.safetensors; TRL's: v_head.* in pytorch_model.bin).
        Returns {name} where the folder has neither (its fresh head is then initialised as TRL does)."""
        from marl_ray.model.adapter_io import VALUE_HEAD_FILE

        model.load_policy(name, folder)
        if (folder / VALUE_HEAD_FILE).is_file():
            return set()
        state = _read_v_head(folder)
        if state is None:
            return {name}
        model.value_heads[name].load_state_dict({k: v.float() for k, v in state.items()})
        return set()

    # ---------------------------------------------------------------- peft is the source of truth
    def sync_with_peft(self):
        """Make the registry follow peft: an adapter added the peft way (`pretrained_model.add_adapter`,
        `load_adapter`) becomes a policy with a fresh value head, one deleted the peft way is dropped,
        the adapter peft calls active is the one that runs, and only policies and value heads train.
        Every method of this class calls it first."""
        reg, peft = self.model, self.model.peft
        if peft is None:
            return
        known = set(peft.peft_config)
        for name in [n for n in reg.roles if n not in known]:
            del reg.roles[name]
            for heads in (reg.value_heads, reg.score_heads):
                if name in heads:
                    del heads[name]
            self._views.pop(name, None)
            reg._lora_cache.clear()
        for name, cfg in peft.peft_config.items():
            if name in reg.roles:
                continue
            if cfg.is_prompt_learning or str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
                raise ValueError(f"adapter {name!r} is a {cfg.peft_type} adapter: only LoRA adapters can be policies")
            reg._check_new_name(name, "policy")
            reg.value_heads[name] = self._init_head(reg._new_value_head())
            reg.roles[name] = "policy"
            reg._lora_cache.clear()
        want = peft.active_adapter
        if want in reg.roles and peft.base_model.active_adapter not in (want, [want]):
            peft.base_model.set_adapter(want)  # a registry pass left another adapter on
        reg._refresh_grad_flags()
        view = None
        if want in reg.value_heads:
            view = self._views.get(want)
            if view is None or view.summary is not reg.value_heads[want]:
                view = self._views[want] = ValueHead(reg.value_heads[want], self.v_head_dropout)
            if view.training != self.training:  # a view cached while another policy was active
                view.train(self.training)
        self._modules["v_head"] = view

    # ---------------------------------------------------------------- TRL's attributes
    @property
    def pretrained_model(self):
        return self.model.peft if self.model.peft is not None else self.model.base

    @property
    def is_peft_model(self) -> bool:
        return self.model.peft is not None

    @property
    def active(self) -> str | None:
        """The active policy: peft's active adapter (None for a full model)."""
        return self.model.peft.active_adapter if self.model.peft is not None else None

    @property
    def policy_adapter_name(self) -> str | None:
        return self.active

    @property
    def v_head(self) -> ValueHead:
        """The active policy's value head (a full model's own), in TRL's layout (`.summary`, `.dropout`)."""
        if self.model.peft is not None:
            self.sync_with_peft()
        head = self._modules["v_head"]
        if head is None:
            raise ValueError(f"the active adapter {self.active!r} is not a policy with a value head: "
                             f"activate one of {self.model.policies} (set_adapter)")
        return head

    @property
    def score(self) -> nn.Module:
        """The reward adapter's score head (TRL's `model.score`)."""
        if self.rm_adapter_name is None:
            raise AttributeError("this model has no reward adapter")
        return self.model.score_heads[self.rm_adapter_name]

    def __getattr__(self, name):
        if name in ("prepare_inputs_for_generation", "gradient_checkpointing_disable", "enable_input_require_grads"):
            return getattr(self.pretrained_model, name)
        return super().__getattr__(name)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        """HF gradient checkpointing on the base (with input grads, so LoRA on a frozen base gets gradients)."""
        self.model.base.gradient_checkpointing_enable(*args, **kwargs)
        if self.model.peft is not None:
            self.model.base.enable_input_require_grads()

    def named_parameters(self, *args, **kwargs):
        self.sync_with_peft()  # an adapter added the peft way has its value head before an optimizer is built
        return super().named_parameters(*args, **kwargs)

    # ---------------------------------------------------------------- policies (our extension)
    def set_adapter(self, name: str):
        """Activate policy `name` (peft's `pretrained_model.set_adapter` does the same)."""
        self.sync_with_peft()
        self.model._require(name, "policy")
        self.model.peft.set_adapter(name)
        self.sync_with_peft()

    def add_policy(self, name: str, peft_config, seed: int | None = None):
        """Another LoRA policy with its own value head (TRL-style init; seeded when `seed` is given);
        `pretrained_model.add_adapter(name, peft_config)` does the same."""
        if self.model.peft is None:
            raise ValueError("a full value-head model has no adapters: load it with peft_config=... to train policies")
        self.sync_with_peft()
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.model.add_policy(name, peft_config, seed=seed)
            self._init_head(self.model.value_heads[name])
        self.sync_with_peft()

    # ---------------------------------------------------------------- passes
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False,
                **kwargs):
        """(lm_logits fp32 (B, T, V), loss (with `labels`) or None, value (B, T)) under the active policy,
        plus the past key values with `return_past_key_values=True`; other arguments go to the model."""
        self.sync_with_peft()
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        # The final hidden states come from a hook on the decoder held for this call only: asking
        # transformers for output_hidden_states installs hooks on the layers for good, and with
        # them the registry's own passes leave their fast path.
        get_decoder = getattr(self.model.base, "get_decoder", None)
        decoder = get_decoder() if get_decoder is not None else None
        if decoder is None or kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = True
            out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = out.hidden_states[-1]
        else:
            seen = []
            handle = decoder.register_forward_hook(
                lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o.last_hidden_state))
            try:
                out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            finally:
                handle.remove()
            hidden = seen[-1]
        value = self.v_head(hidden).squeeze(-1)
        logits = out.logits if out.logits.dtype == torch.float32 else out.logits.float()
        if return_past_key_values:
            return logits, out.loss, value, out.past_key_values
        return logits, out.loss, value

    def generate(self, *args, **kwargs):
        """The model's `generate` under the active policy (HF arguments pass through)."""
        self.sync_with_peft()
        return self.pretrained_model.generate(*args, **kwargs)

    @torch.no_grad()
    def compute_reward_score(self, input_ids, attention_mask=None, ppo_adapter_name: str | None = None,
                             reward_adapter_name: str | None = None, **_ignored):
        """Per-token reward scores (B, T, num_labels) from the reward adapter.

        Afterwards the policy named by `ppo_adapter_name` (default: the one active before) is
        the active one, and every module's train/eval mode is as it was.
        """
        name = reward_adapter_name or self.rm_adapter_name
        if name is None:
            raise ValueError("this model has no reward adapter: pass reward_adapter=... (with peft_config=...) to "
                             "from_pretrained")
        self.sync_with_peft()
        target = ppo_adapter_name if ppo_adapter_name is not None else self.active
        if ppo_adapter_name is not None:
            self.model._require(ppo_adapter_name, "policy")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            scores = self.model.token_scores(name, self.model.hidden(input_ids, attention_mask, name))
        finally:
            if target in self.model.roles:
                self.model.peft.set_adapter(target)
            self.sync_with_peft()
        return scores

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask=None, reward_adapter_name: str | None = None):
        """One reward per sequence at its last real token, right, left or no padding. (B,)"""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        per_token = self.compute_reward_score(input_ids, attention_mask, reward_adapter_name=reward_adapter_name)
        idx = last_token_index(attention_mask)
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), idx, 0]

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, *args, keep_vars: bool = False, **kwargs):
        """TRL's: the full model's weights plus `v_head.*`; a peft model's `v_head.*` alone (its
        adapters are saved by peft)."""
        self.sync_with_peft()
        state = {} if self.is_peft_model else dict(self.pretrained_model.state_dict(keep_vars=keep_vars))
        for k, v in self.v_head.state_dict(keep_vars=keep_vars).items():
            state[f"{V_HEAD_PREFIX}{k}"] = v
        return state

    def post_init(self, state_dict: dict):
        """TRL's: load `v_head.*` weights from a state dict into the (active) value head."""
        head = {k[len(V_HEAD_PREFIX):].replace("summary.", ""): v for k, v in state_dict.items()
                if k.startswith(V_HEAD_PREFIX)}
        if head:
            self.v_head.summary.load_state_dict({k: v.float() for k, v in head.items()})

    def save_pretrained(self, save_directory, *args, adapter_name: str | None = None, max_shard_size=None,
                        state_dict=None, safe_serialization: bool = True, **kwargs):
        """TRL's layout, which TRL 0.11 loads too.

        Full model: the model's own `save_pretrained` with `v_head.*` beside its weights (sharded by
        `max_shard_size`). Peft model: the policy `adapter_name` (default: "default" if it is a
        policy, else the active one) as a peft folder (adapter_config.json + adapter_model.safetensors)
        with its value head in TRL's pytorch_model.bin (`v_head.*`) and ours (value_head.safetensors
        + marl_ray.json); without `adapter_name`, every other policy in a subfolder of its name.
        Files already in the folder (a tokenizer, say) are kept. Reward adapters are not written:
        they are inputs, loaded from their own folder."""
        self.sync_with_peft()
        folder = Path(save_directory)
        if not self.is_peft_model:
            state = state_dict if state_dict is not None else self.state_dict()
            if max_shard_size is not None:
                kwargs["max_shard_size"] = max_shard_size
            self.pretrained_model.save_pretrained(str(folder), *args, state_dict=state, **kwargs)
            return
        reg = self.model
        if adapter_name is not None:
            reg._require(adapter_name, "policy")
            top, others = adapter_name, []
        else:
            top = "default" if reg.roles.get("default") == "policy" else self.active
            others = [p for p in reg.policies if p != top]
        self._save_policy_files(top, folder, state_dict)
        for name in others:
            self._save_policy_files(name, folder / name, None)

    def _save_policy_files(self, name: str, folder: Path, state_dict: dict | None):
        from marl_ray.model.adapter_io import META_FILE

        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.tmp-", dir=folder.parent) as tmp:
            staged = Path(tmp) / "policy"
            self.model.save_policy(name, staged)
            if state_dict is None:
                head = self.model.value_heads[name]
                state_dict = {f"{V_HEAD_PREFIX}summary.{k}": v.detach().cpu().contiguous()
                              for k, v in head.state_dict().items()}
            torch.save(state_dict, staged / TRL_V_HEAD_FILE)
            _loosen_adapter_config(staged / "adapter_config.json")
            for f in sorted(staged.iterdir(), key=lambda f: f.name == META_FILE):  # marl_ray.json last
                os.replace(f, folder / f.name)

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError("push_to_hub is not offered (nothing here talks to the hub): save_pretrained(folder), "
                                  "then upload the folder with huggingface_hub.upload_folder")


def _loosen_adapter_config(path: Path):
    """Leave out of adapter_config.json the fields at peft's defaults that older peft releases do not
    know (peft 0.13, TRL 0.11.4's, refuses unknown fields); any newer peft reads the defaults back."""
    from peft import LoraConfig

    data = json.loads(path.read_text())
    defaults = LoraConfig().to_dict()
    known_to_peft_013 = {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
        "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora"}
    for k in list(data):
        if k not in known_to_peft_013 and k in defaults and _same(data[k], defaults[k]):
            del data[k]
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _same(a, b) -> bool:
    norm = lambda x: json.loads(json.dumps(x, default=str))  # noqa: E731 (enums, sets)
    try:
        return norm(a) == norm(b)
    except (TypeError, ValueError):
        return False
