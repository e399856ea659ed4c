"""The adapter registry: a frozen base and its named LoRA adapters, each with a role and a head.

| role      | on the shared base                                                    |
| --------- | --------------------------------------------------------------------- |
| policy    | trainable LoRA adapter + fp32 value head `Linear(H, 1)`               |
| reward    | frozen LoRA adapter + frozen score head `Linear(H, num_labels)`       |
| reference | the base with adapters disabled, or a frozen LoRA adapter named `ref` |

Adding, loading (all-or-nothing), saving adapters and keeping the grad flags right (only
policies and value heads train) happen here; peft itself is reached through `routing`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from marl_ray.model import routing
from marl_ray.model.adapter_io import (
    ADAPTER_WEIGHTS, META_FILE, VALUE_HEAD_FILE, AdapterError, atomic_dir, base_fingerprint, read_adapter,
    read_meta, resolve_folder, split_score_head,
)
from marl_ray.model.routing import BASE

log = logging.getLogger(__name__)

REF = "ref"  # the reference role in row lists; also the adapter name of a LoRA reference


class AdapterRegistry(nn.Module):
    """A frozen base with named policy, reward and reference adapters (see module docstring)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.peft = None  # a PeftModel around `base`, made when the first adapter arrives
        self.value_heads = nn.ModuleDict()
        self.score_heads = nn.ModuleDict()
        self.roles: dict[str, str] = {}
        self.quantization = ("4bit" if getattr(base, "is_loaded_in_4bit", False)
                             else "8bit" if getattr(base, "is_loaded_in_8bit", False) else "none")
        self.fingerprint = base_fingerprint(base)
        # the decoder's width (GPT-2 calls it n_embd; a multimodal config keeps it in its text config)
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.hidden_size = cfg.hidden_size
        self._lora_cache: dict[str, dict[str, nn.Parameter]] = {}

    # ---------------------------------------------------------------- adapters
    @property
    def policies(self) -> list[str]:
        return [n for n, r in self.roles.items() if r == "policy"]

    @property
    def rewards(self) -> list[str]:
        return [n for n, r in self.roles.items() if r == "reward"]

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    def _check_new_name(self, name: str, role: str):
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise AdapterError(f"adapter name {name!r} is not allowed (non-empty, no '.', not {BASE!r})")
        if name == REF and role != "reference":
            raise AdapterError(f"{REF!r} is reserved for the reference adapter: name the {role} something else")
        if name in self.roles:
            raise AdapterError(f"adapter name {name!r} is already used by a {self.roles[name]} adapter: "
                               "each adapter needs its own name")

    def _inject(self, name: str, config, what: str | None = None):
        """Add an (untrained) LoRA adapter `name` to the base. Its target_modules: null = the
        architecture's default, all-linear, or names that must each match a module of the base
        (`targets.resolve`: the error names the base's linear layers)."""
        import copy

        from marl_ray.model import targets

        config = copy.deepcopy(config)
        config.target_modules = targets.resolve(config.target_modules, self.base,
                                                f"{what or f'adapter {name!r}'}: target_modules")
        if targets.conv1d_only(config.target_modules, self.base):
            config.fan_in_fan_out = True  # GPT-2's Conv1D keeps its weight transposed
        self.peft = routing.inject(self.peft, self.base, name, config)
        self._lora_cache.clear()

    def _lora_params(self, name: str) -> dict[str, nn.Parameter]:
        """Parameter name -> LoRA tensor of adapter `name` (looked up once per set of adapters:
        training reads it several times per minibatch)."""
        if self.peft is None:
            return {}
        if name not in self._lora_cache:
            self._lora_cache[name] = routing.lora_parameters(self.peft, name)
        return dict(self._lora_cache[name])

    def _refresh_grad_flags(self):
        """Only policy adapters and value heads are trainable. peft's set_adapter/add_adapter
        switch requires_grad on for whatever they touch: this undoes that."""
        if self.peft is not None:
            self.peft.requires_grad_(False)
        for name in self.policies:
            for p in self._lora_params(name).values():
                p.requires_grad_(True)
        self.value_heads.requires_grad_(True)
        self.score_heads.requires_grad_(False)

    def _new_value_head(self) -> nn.Linear:
        head = nn.Linear(self.hidden_size, 1, dtype=torch.float32, device=self.device)
        nn.init.normal_(head.weight, std=1.0 / (self.hidden_size + 1))
        nn.init.zeros_(head.bias)
        return head

    def add_policy(self, name: str, lora_config, seed: int | None = None, value_head: bool = True):
        """A new trainable LoRA adapter and, for an algorithm with a critic, an fp32 value head
        (seeded init when `seed` is given)."""
        self._check_new_name(name, "policy")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self._inject(name, lora_config, f"policy {name!r}")
            head = self._new_value_head() if value_head else None
        if head is not None:
            self.value_heads[name] = head
        self.roles[name] = "policy"
        self._refresh_grad_flags()

    def _load_lora(self, name: str, role: str, config, lora_state: dict, what: str):
        """Inject adapter `name` and copy its weights in; all-or-nothing (nothing changes on error)."""
        self._inject(name, config, what)
        try:
            params = dict(self._lora_params(name))
            if not params:
                from marl_ray.model.targets import linear_names

                raise AdapterError(f"{what}: its target modules {sorted(config.target_modules or [])} match "
                                   f"no module of this base; its linear layers are named "
                                   f"{', '.join(linear_names(self.base))}")
            want = {}
            for k, v in lora_state.items():
                target = k.replace(".weight", f".{name}.weight") if ("lora_A" in k or "lora_B" in k) else k
                if target not in params:
                    raise AdapterError(f"{what}: weight {k} has no place in this base: it was trained on "
                                       "another architecture")
                if params[target].shape != v.shape:
                    raise AdapterError(f"{what}: weight {k} has shape {tuple(v.shape)}, this base needs "
                                       f"{tuple(params[target].shape)}: it was trained on another base")
                want[target] = v
            missing = sorted(set(params) - set(want))
            if missing:
                raise AdapterError(f"{what}: {len(missing)} LoRA weights are missing (e.g. {missing[0]}); "
                                   "the folder is incomplete")
            with torch.no_grad():
                for k, v in want.items():
                    params[k].copy_(v.to(params[k].dtype))
        except BaseException:
            routing.delete(self.peft, name)
            self._lora_cache.clear()
            raise
        self.roles[name] = role

    def _check_base(self, folder: Path, what: str) -> dict:
        meta = read_meta(folder)
        fp = meta.get("base_fingerprint")
        if fp and fp != self.fingerprint:
            raise AdapterError(
                f"{what} was trained on a different base (fingerprint {fp}, this base is {self.fingerprint}): "
                "stages 2 and 3 must use the same base model; retrain the adapter on this base")
        if not fp:  # a plain peft/TRL folder: its adapter_config.json names the base it was trained on
            self._check_named_base(folder, what)
        q = meta.get("quantization")
        if q and q != self.quantization:
            log.warning("%s was trained on a %s base and is used on a %s base: scores may differ", what, q,
                        self.quantization)
        return meta

    def _check_named_base(self, folder: Path, what: str):
        """An adapter folder without marl_ray.json: where `base_model_name_or_path` is a local folder,
        its fingerprint must be this base's; where it names something else, a warning names both."""
        from marl_ray.model.adapter_io import ADAPTER_CONFIG, folder_fingerprint

        try:
            named = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            return
        mine = str(getattr(self.base, "name_or_path", "") or "")
        if not named or named == mine:
            return
        if Path(named).is_dir():
            fp = folder_fingerprint(named)
            if fp is not None and fp != self.fingerprint:
                raise AdapterError(
                    f"{what} was trained on the base {named} (fingerprint {fp}), not on the base in use "
                    f"{mine or '(unnamed)'} (fingerprint {self.fingerprint}): stages 2 and 3 must use the same "
                    "base model; retrain the adapter on this base")
            if fp is not None:
                return  # the same weights under another path
        log.warning("%s names its base %r; the base in use is %r: make sure they are the same weights", what, named,
                    mine)

    def load_policy(self, name: str, path: str | Path, value_head: bool = True):
        """Load a policy folder written by `save_policy`. value_head: give it one (the folder's, or a
        fresh one where the folder has none); False: none (a critic-free algorithm)."""
        folder = resolve_folder(str(path), f"policy {name!r}")
        self._check_new_name(name, "policy")
        what = f"policy {name!r} ({folder})"
        self._check_base(folder, what)
        config, state = read_adapter(folder, what)
        lora, _ = split_score_head(state)
        head = self._new_value_head() if value_head else None
        if head is not None and (folder / VALUE_HEAD_FILE).exists():
            from safetensors.torch import load_file

            head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
        self._load_lora(name, "policy", config, lora, what)
        if head is not None:
            self.value_heads[name] = head
        self._refresh_grad_flags()

    def add_reward(self, name: str, path: str | Path):
        """Load a frozen reward adapter + score head (our format or TRL RewardTrainer's SEQ_CLS)."""
        self._check_new_name(name, "reward")
        folder = resolve_folder(str(path), f"reward adapter {name!r}")
        what = f"reward adapter {name!r} ({folder})"
        self._check_base(folder, what)
        config, state = read_adapter(folder, what)
        lora, head_state = split_score_head(state)
        if "weight" not in head_state:
            raise AdapterError(f"{what} has no score head (expected 'score.weight' saved through modules_to_save, "
                               "as TRL's RewardTrainer does with task_type='SEQ_CLS'): is it a policy adapter?")
        w = head_state["weight"]
        if w.ndim != 2 or w.shape[1] != self.hidden_size:
            raise AdapterError(f"{what}: score head has shape {tuple(w.shape)}, this base's hidden size is "
                               f"{self.hidden_size}: it was trained on another base")
        head = nn.Linear(self.hidden_size, w.shape[0], bias="bias" in head_state, dtype=torch.float32,
                         device=self.device)
        head.load_state_dict({k: v.float() for k, v in head_state.items()})
        self._load_lora(name, "reward", config, lora, what)
        self.score_heads[name] = head
        self._refresh_grad_flags()

    def set_reference_adapter(self, path: str | Path):
        """Use a frozen LoRA adapter (e.g. the output of a LoRA SFT stage) as the reference."""
        self._check_new_name(REF, "reference")
        folder = resolve_folder(str(path), "reference adapter")
        what = f"reference adapter ({folder})"
        self._check_base(folder, what)
        config, state = read_adapter(folder, what)
        lora, _ = split_score_head(state)
        self._load_lora(REF, "reference", config, lora, what)
        self._refresh_grad_flags()

    def save_policy(self, name: str, folder: str | Path):
        """Write policy `name` as a plain peft folder + value head (if it has one), atomically."""
        from safetensors.torch import save_file

        self._require(name, "policy")
        state = routing.state_dict(self.peft, name)
        with atomic_dir(folder) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS))
            routing.save_config(self.peft, name, str(tmp))
            if name in self.value_heads:
                head = {k: v.detach().contiguous().cpu() for k, v in self.value_heads[name].state_dict().items()}
                save_file(head, str(tmp / VALUE_HEAD_FILE))
            meta = {"role": "policy", "name": name, "base_fingerprint": self.fingerprint,
                    "quantization": self.quantization, "dtype": str(self.base.dtype).replace("torch.", "")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    def policy_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of policy `name`: its LoRA weights and value head (if any)."""
        self._require(name, "policy")
        head = list(self.value_heads[name].parameters()) if name in self.value_heads else []
        return list(self._lora_params(name).values()) + head

    def policy_state(self, name: str) -> dict[str, torch.Tensor]:
        """Name -> tensor of everything trainable in policy `name` (for sync and checksums)."""
        state = dict(self._lora_params(name))
        if name in self.value_heads:
            state.update({f"value_head.{k}": p for k, p in self.value_heads[name].named_parameters()})
        return state

    def _require(self, name: str, role: str):
        if self.roles.get(name) != role:
            known = [n for n, r in self.roles.items() if r == role]
            raise AdapterError(f"no {role} adapter named {name!r}; known {role} adapters: {known}")


    # ---------------------------------------------------------------- routing
    def _peft_name(self, name: str) -> str:
        if name in (REF, BASE):
            return REF if self.roles.get(REF) == "reference" else BASE
        if name not in self.roles:
            raise AdapterError(f"no adapter named {name!r}; known: {sorted(self.roles)}")
        return name

    def route(self, names: Sequence[str]):
        """A context in which row b of a pass runs under adapter names[b] ("ref" = the reference)."""
        names = [self._peft_name(n) for n in names]
        if self.peft is None and set(names) != {BASE}:
            raise AdapterError(f"no adapters loaded, cannot run {sorted(set(names))}")
        return routing.route(self.peft, names, on_switch=self._refresh_grad_flags)

    def lora_rows(self, names: Sequence[str]) -> list[tuple[str | None, int, int]]:
        """Consecutive rows under the same adapter: (peft adapter name, None for none; start; end)."""
        rows: list[tuple[str | None, int, int]] = []
        for i, n in enumerate(names):
            name = self._peft_name(n)
            name = None if name == BASE else name
            if rows and rows[-1][0] == name:
                rows[-1] = (name, rows[-1][1], i + 1)
            else:
                rows.append((name, i, i + 1))
        return rows
