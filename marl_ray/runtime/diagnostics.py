"""What a model host reports about itself: memory, the base's copies, checksums of frozen parts."""

from __future__ import annotations

import gc
import hashlib
import resource
import warnings

import torch


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:
        return "local"


def base_copies(model) -> int:
    """How many tensors in this process hold the base's embedding matrix (1 = one base)."""
    emb = model.base.get_input_embeddings().weight
    ptrs = {t.untyped_storage().data_ptr() for t in live_tensors()
            if t.shape == emb.shape and t.dtype == emb.dtype and t.device == emb.device and torch.equal(t, emb)}
    return len(ptrs)


def role_checksum(model, name: str) -> str:
    """sha256 of adapter `name`'s LoRA tensors and its head (score head of a reward, value head of a
    policy), bit-exact, in name order: shows an adapter left untouched by training."""
    heads = {**model.score_heads, **model.value_heads}
    tensors = dict(model._lora_params(name))
    if name in heads:
        tensors.update({f"head.{k}": v for k, v in heads[name].named_parameters()})
    return digest(tensors)


def base_checksum(model) -> str:
    """sha256 of every base parameter and buffer (LoRA weights excluded), bit-exact, in name order."""
    tensors = {k: v for k, v in model.base.named_parameters() if "lora_" not in k}
    tensors.update({f"buffer.{k}": v for k, v in model.base.named_buffers() if "lora_" not in k})
    return digest(tensors)


def digest(tensors: dict) -> str:
    """sha256 of the raw bytes of named tensors (any dtype, quantized storage included), in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]


def live_tensors():
    frozen = gc.get_freeze_count()  # vLLM gc.freeze()s its start-up objects: list those too
    if frozen:
        gc.unfreeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on some torch module objects warns
            objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    finally:
        if frozen:
            gc.freeze()
    return objs
