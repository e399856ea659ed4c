"""One calling convention for actors in Ray and in-process.

`LocalHandle(obj).method.remote(...)` runs the method at once and returns a `Done`; `get`
resolves Ray ObjectRefs and Dones alike. The learner is written once against this; the
in-process runtime (benchmarks, debugging) wraps plain objects, the Ray runtime passes
actor handles.
"""

from __future__ import annotations


class Done:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _LocalMethod:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs) -> Done:
        return Done(self._fn(*args, **kwargs))


class LocalHandle:
    """Wraps a plain object so that `handle.method.remote(...)` works as on a Ray actor."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return _LocalMethod(getattr(self._obj, name))


def get(refs, timeout: float | None = None):
    """ray.get for ObjectRefs, Dones, and lists of either (`timeout`: seconds, Ray only)."""
    if isinstance(refs, list):
        if refs and all(isinstance(r, Done) for r in refs):
            return [r.value for r in refs]
        if any(isinstance(r, Done) for r in refs):
            return [get(r, timeout) for r in refs]
    elif isinstance(refs, Done):
        return refs.value
    import ray

    return ray.get(refs, timeout=timeout)


def put(value, local: bool):
    if local:
        return value
    import ray

    return ray.put(value)
