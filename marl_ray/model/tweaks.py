"""Process-wide settings, each a named function that a caller opts into, with the reason it exists.

Loading a model changes nothing outside the model. A process that owns its memory (a model host,
a benchmark) asks for these explicitly; a library user who only loads a model gets none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_GLIBC_MAX_DYNAMIC_THRESHOLD = 32 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: every tweak below is a no-op
        return None


def map_large_blocks(threshold: int = 1 << 20) -> bool:
    """glibc: allocate blocks of `threshold` bytes or more with mmap, so that freeing one returns its
    memory to the OS at once instead of keeping it in the heap.

    Why: a 4/8-bit base dequantizes full-precision temporaries on every pass; kept in the heap they
    pile up (`large` 4-bit: peak 625 -> 274 MiB over one iteration with this on). A full-precision
    base gains no memory from it and runs 10-25% slower steps from the page faults, so only a
    quantized base asks for it. Returns False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    return True


def restore_dynamic_threshold() -> bool:
    """glibc: undo `map_large_blocks` with the largest dynamic mmap threshold (training reuses its blocks)."""
    return map_large_blocks(_GLIBC_MAX_DYNAMIC_THRESHOLD)


def trim_heap() -> bool:
    """glibc: give the heap's free pages back to the OS (after a load that freed its temporaries)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def streamed_checkpoint_reads(keep_large_blocks_mapped: bool = False):
    """While loading a base whose weights are converted (quantized, or cast to another dtype):
    safetensors reads each tensor with pread instead of mapping the file, and glibc maps blocks of
    1 MiB or more, so the load peaks at the size of the result, not the result plus the checkpoint
    (a mapped file's touched pages count as resident until the load ends; measured on `large`,
    4-bit: 944 -> 179 MiB above baseline after the load).

    It replaces `transformers.modeling_utils.safe_open` for the duration of the block (restored
    after) and changes glibc's mmap threshold: restored on exit unless `keep_large_blocks_mapped`
    (see `map_large_blocks`), then the heap is trimmed."""
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
    map_large_blocks()
    try:
        yield
    finally:
        if patched:
            mu.safe_open = original
        if not keep_large_blocks_mapped:
            restore_dynamic_threshold()
        trim_heap()


def quiet_known_warnings() -> None:
    """Silence two third-party messages that every model host would print once, and that say nothing
    about the run: peft reading transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
    from transformers 5) and bitsandbytes reporting on a CPU with AVX512-BF16 that the optional
    `kernels` package (a hub download) is absent, after which it uses its own 4-bit kernel."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
