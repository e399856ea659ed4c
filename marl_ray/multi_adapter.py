"""One causal-LM base serving every PPO role through named LoRA adapters.

| role      | on the shared base                                                    |
| --------- | --------------------------------------------------------------------- |
| policy    | trainable LoRA adapter + fp32 value head `Linear(H, 1)`               |
| reward    | frozen LoRA adapter + frozen score head `Linear(H, num_labels)`       |
| reference | the base with adapters disabled, or a frozen LoRA adapter named `ref` |

The base (optionally 4-bit/8-bit with bitsandbytes) is loaded once and frozen. Several roles
share one forward pass through peft's mixed-adapter batches: row b of a batch runs under the
adapter named for it, "__base__" rows under no adapter.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from marl_ray import decoding
from marl_ray.adapter_io import (
    ADAPTER_WEIGHTS, META_FILE, VALUE_HEAD_FILE, AdapterError, atomic_dir, base_fingerprint, read_adapter,
    read_meta, resolve_folder, split_score_head,
)

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
REF = "ref"  # the reference role in row lists; also the adapter name of a LoRA reference
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def positions(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` uses them. (B, T)"""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token; right, left or no padding. (B,)"""
    T = attention_mask_BT.shape[1]
    flipped = attention_mask_BT.long().flip(-1)
    return T - 1 - flipped.argmax(-1)


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


def load_base(name_or_path: str, quantization="none", dtype="fp32", device_map=None):
    """Load a causal LM once, frozen and in eval mode, optionally quantized."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    qcfg = quantization_config(quantization, torch_dtype)
    kwargs = {"dtype": torch_dtype}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}  # a host owns its node's (or its Ray-assigned) GPU
    if device_map is not None:
        kwargs["device_map"] = device_map
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # A quantized or converted base keeps none of the file's bytes: read it tensor by tensor
        # instead of mapping it (a mapped checkpoint stays resident until the load ends).
        with _converting_load(enabled=qcfg is not None or _checkpoint_dtype(name_or_path) not in (None, torch_dtype),
                              keep_lean=qcfg is not None):
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load base model {name_or_path!r}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    model.requires_grad_(False)
    _keep_4bit_layout(model)
    return model.eval()


@contextlib.contextmanager
def _checkpointed_layers(decoder: nn.Module):
    """Run each of `decoder.layers` under torch.utils.checkpoint (non-reentrant): the backward pass
    recomputes a layer from its input instead of keeping its activations. The base stays in eval
    mode, so HF's own switch (train mode only) does not apply; the layers have no dropout, so the
    recomputation is exact."""
    from torch.utils.checkpoint import checkpoint

    layers = list(getattr(decoder, "layers", []))
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run  # the instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _checkpoint_dtype(name_or_path: str):
    """The dtype a local checkpoint's config names (None when unknown)."""
    import json

    cfg = Path(name_or_path) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


@contextlib.contextmanager
def _converting_load(enabled: bool, keep_lean: bool = False):
    """Load a base whose weights are converted (quantized, or cast to another dtype) with the peak
    memory of the result, not of the result plus the checkpoint: safetensors reads each tensor with
    pread instead of mapping the file (whose touched pages count as resident until the load ends),
    and glibc hands each freed full-precision temporary back to the OS at once instead of keeping
    it in its heap (measured on `large`, 4-bit: 944 -> 179 MiB above baseline after the load).

    keep_lean: leave glibc returning freed blocks of 1 MiB or more to the OS for the rest of the
    process. A quantized base asks for it (its dequantized temporaries otherwise pile up in the
    heap: `large` 4-bit peak 625 -> 274 MiB over one iteration); a full-precision one does not
    (no memory gained on `medium` fp32, 10-25% slower steps from the page faults)."""
    if not enabled:
        yield
        return
    import ctypes
    import inspect

    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_open", None)
    patched = False
    try:
        if original is not None and "backend" in inspect.signature(original).parameters:
            def pread_open(*args, **kw):
                kw["backend"] = "pread"
                return original(*args, **kw)

            mu.safe_open = pread_open
            patched = True
    except (TypeError, ValueError):  # a builtin without a signature: leave it
        pass
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        libc = None
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB are mapped, and unmapped when freed
    try:
        yield
    finally:
        if patched:
            mu.safe_open = original
        if libc is not None:
            if not keep_lean:
                libc.mallopt(-3, 32 << 20)  # glibc's largest dynamic threshold: training reuses its blocks
            libc.malloc_trim(0)


def _keep_4bit_layout(model: nn.Module):
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    bitsandbytes (>= 0.48) rewrites a Linear4bit's weight in place into a CPU-only layout the
    first time it runs in eval mode without autograd (e.g. during generation). That crashes
    for out_features not divisible by 32 (Llama's MLP at H=64/256: 176, 688) and leaves later
    training passes on a different weight layout; one layout for every pass is what we test.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@dataclass
class Evaluation:
    """What one evaluate pass returns (R = response length)."""

    logprobs_BR: torch.Tensor
    ref_logprobs_BR: torch.Tensor
    values_BR: torch.Tensor
    scores_B: torch.Tensor
    entropy_BR: torch.Tensor


@dataclass
class RolloutScores:
    """The policy's logprobs, values and entropies of sampled tokens, from the decode steps (B, N)."""

    logprobs_BR: torch.Tensor
    values_BR: torch.Tensor
    entropy_BR: torch.Tensor


class MultiAdapterModel(nn.Module):
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
        self.hidden_size = base.config.hidden_size
        # Sample with decoding.sample (HF generate's sampling, less overhead per step) where the
        # base allows it; False: always HF generate.
        self.lean_generate = True
        # decoding.sample with HF's arithmetic (linear layers as modules, sdpa): the same tokens as
        # HF generate under the same seed. False: LoRA layers computed by decoding._project, eager
        # attention on a CPU; the logits equal to rounding, and faster.
        self.exact_generate = False
        # Scoring and training passes through decoding.LeanLlama too (False: the HF decoder).
        self.lean_passes = True
        self._lean_model = None
        self._lora_cache: dict[str, dict[str, nn.Parameter]] = {}
        # Recompute each decoder layer in the backward pass instead of keeping its activations
        # (training passes only): less memory for one more forward. None = on for a 4/8-bit base,
        # whose point is memory.
        self.gradient_checkpointing = self.quantization != "none"

    @classmethod
    def from_pretrained(cls, name_or_path: str, quantization="none", dtype="fp32", reference_adapter=None,
                        device_map=None, gradient_checkpointing: bool | None = None) -> "MultiAdapterModel":
        base = load_base(name_or_path, quantization, dtype, device_map)
        model = cls(base)
        if gradient_checkpointing is not None:
            model.gradient_checkpointing = bool(gradient_checkpointing)
        if reference_adapter:
            model.set_reference_adapter(reference_adapter)
        return model

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

    def _inject(self, name: str, config):
        """Add an (untrained) LoRA adapter `name` to the base."""
        import copy

        from peft import get_peft_model

        config = copy.deepcopy(config)
        config.task_type = None  # the heads live outside peft (no modules_to_save on the policy side)
        config.modules_to_save = None
        config.inference_mode = False
        config.base_model_name_or_path = getattr(self.base, "name_or_path", None)
        with warnings.catch_warnings():
            # peft warns when a name is a substring of "lora_" (e.g. "a"): harmless for us,
            # since we copy weights in by exact parameter name.
            warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
            if self.peft is None:
                self.peft = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        self._lora_cache.clear()
        self.peft.eval()

    def _lora_params(self, name: str) -> dict[str, nn.Parameter]:
        """Parameter name -> LoRA tensor of adapter `name` (looked up once per set of adapters:
        training reads it several times per minibatch)."""
        if self.peft is None:
            return {}
        if name not in self._lora_cache:
            keys = (f".lora_A.{name}.", f".lora_B.{name}.", f".lora_embedding_A.{name}", f".lora_embedding_B.{name}")
            self._lora_cache[name] = {n: p for n, p in self.peft.named_parameters() if any(k in n for k in keys)}
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

    def add_policy(self, name: str, lora_config, seed: int | None = None):
        """A new trainable LoRA adapter and an fp32 value head (seeded init when `seed` is given)."""
        self._check_new_name(name, "policy")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self._inject(name, lora_config)
            head = nn.Linear(self.hidden_size, 1, dtype=torch.float32, device=self.device)
            nn.init.normal_(head.weight, std=1.0 / (self.hidden_size + 1))
            nn.init.zeros_(head.bias)
        self.value_heads[name] = head
        self.roles[name] = "policy"
        self._refresh_grad_flags()

    def _load_lora(self, name: str, role: str, config, lora_state: dict, what: str):
        """Inject adapter `name` and copy its weights in; all-or-nothing (nothing changes on error)."""
        self._inject(name, config)
        try:
            params = dict(self._lora_params(name))
            if not params:
                raise AdapterError(f"{what}: its target modules {sorted(config.target_modules or [])} match "
                                   "no module of this base")
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
            self.peft.delete_adapter(name)
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
        q = meta.get("quantization")
        if q and q != self.quantization:
            log.warning("%s was trained on a %s base and is used on a %s base: scores may differ", what, q,
                        self.quantization)
        return meta

    def load_policy(self, name: str, path: str | Path):
        """Load a policy folder written by `save_policy` (value head optional: fresh if absent)."""
        folder = resolve_folder(str(path), f"policy {name!r}")
        self._check_new_name(name, "policy")
        what = f"policy {name!r} ({folder})"
        self._check_base(folder, what)
        config, state = read_adapter(folder, what)
        lora, _ = split_score_head(state)
        head = nn.Linear(self.hidden_size, 1, dtype=torch.float32, device=self.device)
        nn.init.normal_(head.weight, std=1.0 / (self.hidden_size + 1))
        nn.init.zeros_(head.bias)
        if (folder / VALUE_HEAD_FILE).exists():
            from safetensors.torch import load_file

            head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
        self._load_lora(name, "policy", config, lora, what)
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
        """Write policy `name` as a plain peft folder + value head, atomically."""
        import json

        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        self._require(name, "policy")
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        with atomic_dir(folder) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS))
            self.peft.peft_config[name].save_pretrained(str(tmp))
            head = {k: v.detach().contiguous().cpu() for k, v in self.value_heads[name].state_dict().items()}
            save_file(head, str(tmp / VALUE_HEAD_FILE))
            meta = {"role": "policy", "name": name, "base_fingerprint": self.fingerprint,
                    "quantization": self.quantization, "dtype": str(self.base.dtype).replace("torch.", "")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    def policy_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of policy `name`: its LoRA weights and value head."""
        self._require(name, "policy")
        return list(self._lora_params(name).values()) + list(self.value_heads[name].parameters())

    def policy_state(self, name: str) -> dict[str, torch.Tensor]:
        """Name -> tensor of everything trainable in policy `name` (for sync and checksums)."""
        state = dict(self._lora_params(name))
        state.update({f"value_head.{k}": p for k, p in self.value_heads[name].named_parameters()})
        return state

    def _require(self, name: str, role: str):
        if self.roles.get(name) != role:
            known = [n for n, r in self.roles.items() if r == role]
            raise AdapterError(f"no {role} adapter named {name!r}; known {role} adapters: {known}")

    # ---------------------------------------------------------------- passes
    def _peft_name(self, name: str) -> str:
        if name in (REF, BASE):
            return REF if self.roles.get(REF) == "reference" else BASE
        if name not in self.roles:
            raise AdapterError(f"no adapter named {name!r}; known: {sorted(self.roles)}")
        return name

    @contextlib.contextmanager
    def _adapters(self, names: Sequence[str]):
        """Run the enclosed passes with row b under adapter names[b].

        One name: peft's active-adapter route (works with autograd and train mode). Several:
        peft's mixed-adapter batch (eval mode, which this model keeps: no dropout in the base).
        """
        names = [self._peft_name(n) for n in names]
        uniq = set(names)
        if self.peft is None:
            if uniq != {BASE}:
                raise AdapterError(f"no adapters loaded, cannot run {sorted(uniq)}")
            yield
            return
        if uniq == {BASE}:
            with self.peft.disable_adapter():
                yield
            return
        if len(uniq) == 1:
            (name,) = uniq
            # The adapter stays active after the pass: every pass names its adapters (nothing reads
            # peft's active adapter otherwise), so the next pass under the same one switches nothing.
            # (PeftModel.active_adapter does not follow base_model.set_adapter: ask the tuner.)
            if self.peft.base_model.active_adapter not in (name, [name]):
                self.peft.base_model.set_adapter(name)
                self._refresh_grad_flags()  # set_adapter switched requires_grad flags: put ours back
            yield
            return
        was_training = self.peft.base_model.training
        self.peft.base_model.eval()
        try:
            with self.peft.base_model._enable_peft_forward_hooks(adapter_names=list(names)):
                yield
        finally:
            self.peft.base_model.train(was_training)

    def hidden(self, input_ids_BT, attention_mask_BT, adapters: str | Sequence[str], keep_from: int = 0) -> torch.Tensor:
        """Final hidden states (B, T - keep_from, H) of positions [keep_from, T), row b under
        adapters[b] ("ref" = the reference). A plain Llama base runs through decoding.LeanLlama
        (eager attention, last layer on the kept positions only), any other through its HF decoder."""
        names = [adapters] * input_ids_BT.shape[0] if isinstance(adapters, str) else list(adapters)
        if not 0 <= keep_from < input_ids_BT.shape[1]:
            raise ValueError(f"keep_from={keep_from} is outside the sequence (length {input_ids_BT.shape[1]})")
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        lean = self._lean() if self.lean_passes else None
        with self._adapters(names):
            if lean is not None:
                return lean.hidden(input_ids_BT, attention_mask_BT, positions(attention_mask_BT), keep_from,
                                   checkpoint=checkpointed, lora_rows=self._lora_rows(names))
            decoder = self.base.get_decoder()
            with _checkpointed_layers(decoder) if checkpointed else contextlib.nullcontext():
                out = decoder(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                              position_ids=positions(attention_mask_BT), use_cache=False)
        return out.last_hidden_state[:, keep_from:]

    def _lora_rows(self, names: Sequence[str]) -> list[tuple[str | None, int, int]]:
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

    def lm_logits(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        # contiguous: callers pass slices ([:, :-1]); a linear layer on a strided 3-D input runs as
        # a batched product over a copy of its weight per row, 2-4x slower than one folded product
        return self.base.get_output_embeddings()(hidden_BTH.contiguous()).float()

    def values(self, name: str, hidden_BTH: torch.Tensor) -> torch.Tensor:
        return self.value_heads[name](hidden_BTH.float()).squeeze(-1)

    def token_scores(self, name: str, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """Per-token reward-head outputs (B, T, num_labels)."""
        return self.score_heads[name](hidden_BTH.float())

    def policy_forward(self, name, input_ids_BT, attention_mask_BT, response_start: int):
        """Policy pass with autograd: (logprobs_BR, values_BR, logits_BRV) of the response tokens.

        Position t-1 predicts token t, so the response's R tokens are scored from positions
        [response_start - 1, T - 1); the value at those positions is the value of the state
        before each response token.
        """
        self._require(name, "policy")
        from marl_ray.ppo import logprobs_from_logits

        h_BRH = self.hidden(input_ids_BT, attention_mask_BT, name, keep_from=response_start - 1)[:, :-1]
        logits_BRV = self.lm_logits(h_BRH)
        logprobs_BR = logprobs_from_logits(logits_BRV, input_ids_BT[:, response_start:])
        return logprobs_BR, self.values(name, h_BRH), logits_BRV

    @torch.no_grad()
    def reward_scores(self, name: str, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        """One reward per sequence, read at its last real token (right, left or no padding). (B,)"""
        self._require(name, "reward")
        h = self.hidden(input_ids_BT, attention_mask_BT, name)
        idx = last_token_index(attention_mask_BT)
        h_BH = h[torch.arange(h.shape[0], device=h.device), idx]
        return self.token_scores(name, h_BH)[:, 0]

    @torch.no_grad()
    def reference_logprobs(self, input_ids_BT, attention_mask_BT, response_start: int) -> torch.Tensor:
        from marl_ray.ppo import logprobs_from_logits

        h = self.hidden(input_ids_BT, attention_mask_BT, REF, keep_from=response_start - 1)[:, :-1]
        return logprobs_from_logits(self.lm_logits(h), input_ids_BT[:, response_start:])

    @torch.no_grad()
    def evaluate(self, input_ids_BT, attention_mask_BT, policies: Sequence[str], rewards: Sequence[str],
                 response_start: int, rollout: RolloutScores | None = None) -> Evaluation:
        """Policy logprobs + values, reference logprobs and reward scores in ONE pass over the base.

        Row b is scored under policy policies[b] and reward adapter rewards[b]; the batch is
        stacked three times (policy rows, reference rows, reward rows) as a mixed-adapter batch.
        `rollout`: the policy's logprobs, values and entropies from the decode steps
        (`generate_scored`); the pass then has no policy rows.
        """
        from marl_ray.ppo import logprobs_from_logits

        B = input_ids_BT.shape[0]
        for p in set(policies):
            self._require(p, "policy")
        for r in set(rewards):
            self._require(r, "reward")
        R = input_ids_BT.shape[1] - response_start
        if rollout is not None and rollout.logprobs_BR.shape != (B, R):
            raise ValueError(f"rollout scores of shape {tuple(rollout.logprobs_BR.shape)} for {B} rows of {R} "
                             "response tokens")
        stacks = 2 if rollout is not None else 3
        ids = input_ids_BT.repeat(stacks, 1)
        mask = attention_mask_BT.repeat(stacks, 1)
        # Only positions from response_start - 1 on are read: the response's logprobs and values,
        # and the reward at each row's last real token (a response has at least one token).
        s = response_start - 1
        names = ([] if rollout is not None else list(policies)) + [REF] * B + list(rewards)
        h = self.hidden(ids, mask, names, keep_from=s)
        h_ref, h_rw = h[-2 * B:-B, :-1], h[-B:]
        tokens_BR = input_ids_BT[:, response_start:]
        ref_logprobs = logprobs_from_logits(self.lm_logits(h_ref), tokens_BR)
        scores = torch.empty(B, dtype=torch.float32, device=h.device)
        last = last_token_index(attention_mask_BT) - s
        if bool((last < 0).any()):
            raise ValueError("a row has no real token at or after response_start - 1: nothing to score")
        for r in set(rewards):
            rows = [i for i, q in enumerate(rewards) if q == r]
            scores[rows] = self.token_scores(r, h_rw[rows, last[rows]])[:, 0]
        if rollout is not None:
            dev = h.device
            return Evaluation(rollout.logprobs_BR.to(dev), ref_logprobs, rollout.values_BR.to(dev), scores,
                              rollout.entropy_BR.to(dev))
        h_pol = h[:B, :-1]
        pol = self._policy_scores(list(policies), tokens_BR, self.lm_logits(h_pol), h_pol)
        return Evaluation(pol.logprobs_BR, ref_logprobs, pol.values_BR, scores, pol.entropy_BR)

    @torch.no_grad()
    def generate(self, input_ids_BT, attention_mask_BT, policies: str | Sequence[str], *, max_new_tokens: int,
                 min_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 do_sample: bool = True, eos_token_id=None, pad_token_id=None) -> torch.Tensor:
        """Sample continuations of left-padded prompts, row b under policies[b]. (B, T + new)"""
        return self._sample(input_ids_BT, attention_mask_BT, policies, False, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0]

    @torch.no_grad()
    def generate_scored(self, input_ids_BT, attention_mask_BT, policies: str | Sequence[str], **kwargs):
        """`generate`, plus the policy logprobs, values and entropies of the sampled tokens read off
        the decode steps (the logits and final hidden states they compute anyway): (tokens,
        RolloutScores), or (tokens, None) where the decode went through HF `generate` or a row is
        not under a policy. They equal `evaluate`'s to rounding (fp32: about 1e-7 per token)."""
        return self._sample(input_ids_BT, attention_mask_BT, policies, True, **kwargs)

    def _sample(self, input_ids_BT, attention_mask_BT, policies, scored: bool, *, max_new_tokens: int,
                min_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                do_sample: bool = True, eos_token_id=None, pad_token_id=None):
        names = [policies] * input_ids_BT.shape[0] if isinstance(policies, str) else list(policies)
        gcfg = self.base.generation_config
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if min_new_tokens is None else min_new_tokens,
            do_sample=do_sample, pad_token_id=gcfg.pad_token_id if pad_token_id is None else pad_token_id,
            eos_token_id=gcfg.eos_token_id if eos_token_id is None else eos_token_id,
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        scored = scored and all(self.roles.get(n) == "policy" for n in names)
        with self._adapters(names):
            if self.lean_generate and max_new_tokens > 0 and self._lean() is not None and \
                    decoding.generation_config_is_plain(gcfg):
                rows = None if self.exact_generate else self._lora_rows(names)
                logits, hidden = ([], []) if scored else (None, None)
                out = decoding.sample(self._lean(), input_ids_BT, attention_mask_BT, lora_rows=rows,
                                      logits_out=logits, hidden_out=hidden, **kwargs)
                if not scored:
                    return out, None
                return out, self._policy_scores(names, out[:, input_ids_BT.shape[1]:], torch.stack(logits, 1),
                                                torch.stack(hidden, 1))
            out = self.base.generate(input_ids=input_ids_BT, attention_mask=attention_mask_BT, **kwargs)
            return out, None

    def _policy_scores(self, names: list[str], tokens_BN, logits_BNV, hidden_BNH) -> RolloutScores:
        """Row b's logprobs of tokens_BN, values under policy names[b]'s value head, and entropies,
        from the logits and final hidden states of the positions that predict those tokens."""
        from marl_ray.ppo import entropy_from_logits, logprobs_from_logits

        logprobs = logprobs_from_logits(logits_BNV, tokens_BN)
        values = torch.empty_like(logprobs)
        for p in set(names):
            rows = [i for i, q in enumerate(names) if q == p]
            values[rows] = self.values(p, hidden_BNH[rows])
        return RolloutScores(logprobs, values, entropy_from_logits(logits_BNV))

    def _lean(self) -> "decoding.LeanLlama | None":
        """Our own loop over the base's layers where the base is a plain HF Llama (see decoding.py)."""
        if not decoding.supports(self.base):  # cheap: checked each call (hooks may come and go)
            return None
        if self._lean_model is None or self._lean_model.base is not self.base:
            self._lean_model = decoding.LeanLlama(self.base)
        return self._lean_model
