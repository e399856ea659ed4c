"""Adapter folders on disk: base fingerprints, metadata, atomic writes, reward/policy formats.

Formats (all are standard peft LoRA folders, loadable by plain peft):
- policy:  adapter_config.json + adapter_model.safetensors + value_head.safetensors + marl_ray.json
- reward:  TRL RewardTrainer's format (task_type SEQ_CLS, score head saved through
           `modules_to_save` as `base_model.model.score.*` in adapter_model.safetensors),
           plus marl_ray.json recording the base fingerprint, dtype and quantization it was
           trained under. Folders written by TRL itself (no marl_ray.json) load too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

META_FILE = "marl_ray.json"
VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
SCORE_PREFIXES = ("base_model.model.score.", "base_model.model.classifier.", "score.", "v_head.summary.")


class AdapterError(ValueError):
    """A problem with an adapter folder or name: the message says what and how to fix it."""


def base_fingerprint(model: torch.nn.Module) -> str:
    """A short hash identifying a base model's architecture and weights.

    Hashes the architecture fields of the config and the input embedding matrix rounded to
    bf16 (embeddings are never quantized by bitsandbytes, so fp32, bf16, 8-bit and 4-bit
    loads of the same checkpoint agree, while a fine-tuned or different base does not).
    Large vocabularies are subsampled to ~1M values to keep this fast.
    """
    return _fingerprint(model.config, model.get_input_embeddings().weight.detach())


def _fingerprint(cfg, emb: torch.Tensor) -> str:
    arch = {k: getattr(cfg, k, None) for k in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    stride = max(1, emb.shape[0] * emb.shape[1] // (1 << 20))
    rows = emb[::stride].to(torch.bfloat16).contiguous().view(torch.int16)
    h.update(rows.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def folder_fingerprint(folder: str | Path) -> str | None:
    """`base_fingerprint` of a local model folder without loading the model: its config and the input
    embedding read from its safetensors files. None where that cannot be read (no config, no
    safetensors, an embedding of an unknown name)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith(_EMBEDDING_KEYS)), None)
            if key is not None:
                return _fingerprint(cfg, f.get_tensor(key))
    return None


def read_meta(folder: str | Path) -> dict:
    p = Path(folder) / META_FILE
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p} is not valid JSON ({e}); the folder may be half-written: re-save it") from e


def resolve_folder(path_or_id: str, what: str) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (where the hub is reachable)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise AdapterError(f"{what} {path_or_id!r} is a file, expected a peft adapter folder")
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path_or_id))
        except Exception as e:  # network, auth, not found: all end here with one clear message
            raise AdapterError(
                f"{what} {path_or_id!r} is not a local folder and could not be fetched from the hub ({e})"
            ) from e
    raise AdapterError(f"{what} {path_or_id!r} does not exist (expected a peft adapter folder or a hub id)")


def read_adapter(folder: Path, what: str):
    """(LoraConfig, state dict) of a peft LoRA folder; clear errors on half-written folders."""
    from peft import LoraConfig

    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise AdapterError(f"{what} {folder} has no {ADAPTER_CONFIG}: not a peft adapter folder (or half-written)")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:
        raise AdapterError(f"{what} {folder}/{ADAPTER_CONFIG} cannot be read as a LoRA config: {e}") from e
    weights = folder / ADAPTER_WEIGHTS
    try:
        if weights.exists():
            from safetensors.torch import load_file

            state = load_file(str(weights))
        elif (folder / ADAPTER_WEIGHTS_BIN).exists():
            state = torch.load(folder / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"{what} {folder} has no {ADAPTER_WEIGHTS}: the folder is incomplete")
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{what} {folder}: adapter weights cannot be read ({e}); the folder may be half-written") from e
    return config, state


def split_score_head(state: dict) -> tuple[dict, dict]:
    """Split an adapter state dict into (LoRA tensors, score head {'weight', maybe 'bias'}).

    Only a key that is exactly the score module's `bias` sets a bias: TRL <= 0.11 set one if
    ANY key contained "bias" (e.g. LoRA `lora_bias`), which broke scores.
    """
    lora, head = {}, {}
    for k, v in state.items():
        prefix = next((p for p in SCORE_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            lora[k] = v
            continue
        leaf = k[len(prefix):].replace("modules_to_save.default.", "")
        if leaf in ("weight", "bias"):
            head[leaf] = v
    return lora, head


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Write a folder atomically: yield a temp folder beside `target`; on success fsync and
    rename it into place (replacing an old `target`); on error remove it, leaving `target` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
