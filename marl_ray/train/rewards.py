"""Programmatic (verifiable) rewards: load a function from a spec, call it safely, combine several rewards.

A ``rewards:`` entry may name a function instead of a reward adapter::

    {name: exact, function: "my_pkg.tasks:exact_match"}      # an importable module
    {name: exact, function: "path/to/task.py:exact_match"}   # a file, relative to the config's folder or the cwd

The function is called as TRL's GRPOTrainer calls reward functions::

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]

with one entry per completion in each list, in the forms TRL passes them:

* text data: each prompt and each completion a ``str``;
* conversational data (prompts are lists of ``{role, content}`` messages): each prompt its list of messages
  and each completion ``[{"role": "assistant", "content": TEXT}]``;
* ``completion_ids``: each completion's token ids (up to and including the EOS or end-of-turn token that
  ended it); ``trainer_state``: a ``RewardState`` (``global_step``, ``max_steps``, ``policy``, ...);
* ``columns``: the prompt data set's other fields (for example ``answer``).

``None`` means "not applicable" and becomes NaN; an ``async def`` function is awaited in a fresh event loop.
Every function TRL accepts works here. We are a little more lenient: a function without ``**kwargs`` gets
only the keywords it names (TRL always passes every column, ``completion_ids`` and ``trainer_state``, so
there it needs ``**kwargs`` or all of their names). TRL's ``log_extra``, ``log_metric`` and ``environments``
are not provided.

``combine`` forms the weighted total exactly as TRL 1.16's GRPOTrainer (``sum_then_normalize``) does: a
weighted ``nansum`` over the rewards, NaN where every reward of a row is NaN, and nan-aware per-reward stats.

Problems found before a run are ``ConfigError``s whose message starts with the config field
(``rewards[1].function: ...``); problems while calling a function are ``RewardFunctionError``s naming it
(and, where it failed on the data's form, saying which form it got).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import importlib
import importlib.util
import inspect
import itertools
import math
import numbers
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from marl_ray.algorithms.rewards import combine, nanstd
from marl_ray.config import ConfigError

__all__ = ["RewardFunction", "RewardFunctionError", "RewardState", "check_function", "combine", "load_function",
           "nanstd"]

_STANDARD = ("prompts", "completions")
# Keyword arguments TRL's GRPOTrainer passes besides prompts, completions and the data columns, which the
# learner passes too (each to a function that accepts it: by name or through **kwargs).
_PROVIDED = ("completion_ids", "trainer_state")
# Keyword arguments TRL's GRPOTrainer passes that we do not provide.
_TRL_EXTRAS = ("log_extra", "log_metric", "environments")
_SHAPE = "fn(prompts, completions, **columns) -> list[float | None]"
_counter = itertools.count()


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something unusable; the message names the function and its spec."""

    def __init__(self, message: str, name: str = "", spec: str = "", step: Optional[int] = None):
        super().__init__(message)
        self.name, self.spec, self.step = name, spec, step


def _fail(at: str, msg: str) -> ConfigError:
    return ConfigError(f"{at}: {msg}" if at else msg)


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------- loading


def _is_file_spec(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _where(exc: BaseException) -> str:
    """' (at file:line)' of the innermost frame of an exception's traceback, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _import_error(what: str, exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        where = "" if exc.filename == what else f" in {exc.filename}"
        return f"cannot import {what}: SyntaxError{where} at line {exc.lineno}: {exc.msg}{text}"
    return f"cannot import {what}: {type(exc).__name__}: {exc}{_where(exc)}"


def _load_file(path_text: str, at: str, base_dir: Optional[Union[str, os.PathLike]]) -> Any:
    path = Path(path_text).expanduser()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not path.is_absolute():
        path = base / path
    path = path.resolve()
    relative_to = f"relative to {base}" if base_dir is not None else f"relative to the working directory {base}"
    if not path.exists():
        raise _fail(at, f"file {path_text!r} not found (looked for {path}; a relative path is {relative_to})")
    if not path.is_file():
        raise _fail(at, f"{path_text!r} is not a file ({path})")
    if path.suffix != ".py":
        raise _fail(at, f"{path_text!r} is not a Python file (expected a .py file)")
    name = f"_marl_ray_reward_{next(_counter)}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - .py files always have a loader
        raise _fail(at, f"cannot import {path}: no loader for it")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look a class's module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise _fail(at, _import_error(str(path), e)) from e
    return module


def _load_module(module_name: str, at: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise _fail(at, f"no module named {e.name!r} (is the package installed, or its folder on PYTHONPATH? "
                            f"for a file write path/to/file.py:function)") from e
        raise _fail(at, _import_error(f"module {module_name!r}", e)) from e
    except Exception as e:
        raise _fail(at, _import_error(f"module {module_name!r}", e)) from e


def _callables(module: Any) -> list[str]:
    """Public callables defined in the module (all public callables if none is defined there)."""
    names = [k for k, v in vars(module).items() if not k.startswith("_") and callable(v)]
    own = [k for k in names if getattr(vars(module)[k], "__module__", None) == module.__name__]
    return sorted(own or names)


def load_function(spec: str, field: str, base_dir: Optional[Union[str, os.PathLike]] = None) -> Callable:
    """Import the reward function ``spec`` ("pkg.module:function" or "path/to/file.py:function").

    A file path is relative to ``base_dir`` (for example the config file's folder), else to the working
    directory; the file is loaded under a unique module name. Raises ``ConfigError`` starting with ``field``
    when the spec is malformed, the module cannot be imported, the function is missing or not callable, or
    its signature cannot be called as ``fn(prompts=..., completions=..., **columns)``.
    """
    if not isinstance(spec, str):
        raise _fail(field, f"expected 'module:function' or 'path/to/file.py:function', got {type(spec).__name__} "
                           f"{_short(spec)}")
    text = spec.strip()
    module_text, sep, attr = text.rpartition(":")
    if not sep:
        raise _fail(field, f"{spec!r} has no ':'; write 'module:function' or 'path/to/file.py:function'")
    if not module_text or not attr.strip():
        missing = "module or file" if not module_text else "function name"
        raise _fail(field, f"{spec!r} has no {missing}; write 'module:function' or 'path/to/file.py:function'")
    attr = attr.strip()
    if _is_file_spec(module_text):
        module = _load_file(module_text, field, base_dir)
        where = module_text
    else:
        module = _load_module(module_text, field)
        where = f"module {module_text!r}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            options = _callables(obj) if obj is module else [k for k in dir(obj) if not k.startswith("_")]
            close = difflib.get_close_matches(part, options, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            listing = ", ".join(options) if options else "none"
            raise _fail(field, f"{where} has no {attr!r}; {hint}its functions: {listing}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _fail(field, f"{text} is a {type(obj).__name__} ({_short(obj, 40)}), not a function")
    problem = _Signature.of(obj).problem()
    if problem:
        raise _fail(field, f"{text}: {problem}")
    return obj


# ------------------------------------------------------------------------------------------ signature


@dataclass(frozen=True)
class _Signature:
    """What a reward function accepts by keyword. ``known`` is False when inspect cannot read it."""

    text: str = "(...)"
    named: tuple[str, ...] = ()  # parameters that can be passed by keyword
    required: tuple[str, ...] = ()  # of those, the ones without a default
    positional_only: tuple[str, ...] = ()  # positional-only parameters without a default
    var_kw: bool = True
    known: bool = False

    @staticmethod
    def of(fn: Callable) -> "_Signature":
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins: nothing to check, call it and see
            return _Signature()
        P = inspect.Parameter
        ps = list(sig.parameters.values())
        named = tuple(p.name for p in ps if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY))
        required = tuple(p.name for p in ps if p.name in named and p.default is P.empty)
        pos_only = tuple(p.name for p in ps if p.kind is P.POSITIONAL_ONLY and p.default is P.empty)
        var_kw = any(p.kind is P.VAR_KEYWORD for p in ps)
        return _Signature(str(sig), named, required, pos_only, var_kw, True)

    def accepts(self, name: str) -> bool:
        return self.var_kw or name in self.named

    def columns_required(self) -> tuple[str, ...]:
        return tuple(n for n in self.required if n not in _STANDARD and n not in _PROVIDED)

    def problem(self) -> str:
        """Why the function cannot be called as fn(prompts=..., completions=..., **columns), or ''."""
        if self.positional_only:
            return (f"parameter {self.positional_only[0]!r} is positional-only, but reward functions are called "
                    f"with keywords; the signature must be {_SHAPE} (as for TRL's GRPOTrainer), got {self.text}")
        missing = [n for n in _STANDARD if not self.accepts(n)]
        if missing:
            return (f"does not accept {' or '.join(repr(n) for n in missing)}; the signature must be {_SHAPE} "
                    f"(as for TRL's GRPOTrainer; **kwargs may take what the function does not use), got {self.text}")
        return ""


def _columns_text(columns: Sequence[str]) -> str:
    return f"its columns: {', '.join(columns)}" if columns else "it has no columns besides the prompt"


def _missing_text(missing: Sequence[str], columns: Sequence[str], what: str) -> str:
    names = ", ".join(repr(m) for m in missing)
    extra = [m for m in missing if m in _TRL_EXTRAS]
    hint = f"; TRL's {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not provided here" if extra else ""
    return (f"requires {'keyword' if len(missing) == 1 else 'keywords'} {names} that {what} does not have "
            f"({_columns_text(columns)}){hint}")


# ------------------------------------------------------------------------------------------ the forms


@dataclass(frozen=True)
class RewardState:
    """What a reward function's ``trainer_state`` holds: the run's progress, as TRL's GRPOTrainer passes its
    ``TrainerState`` (fields named as there where they mean the same).

    ``global_step``: updates done so far (0 while the first step's completions are scored; the number of
    steps done in a held-out evaluation); ``max_steps``: the run's ``ppo.steps``; ``policy``: the policy
    whose completions are scored; ``algorithm`` and ``num_generations``: that policy's."""

    global_step: int
    max_steps: int
    policy: str = ""
    algorithm: str = ""
    num_generations: int = 1


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, Mapping) for m in x)


def _form_text(completions: Sequence) -> str:
    """Which form of data a call gave, in words, for an error message."""
    conv = [_is_messages(c) for c in completions]
    if conv and all(conv):
        return ("it got conversational data: each prompt a list of {role, content} messages and each completion "
                "[{'role': 'assistant', 'content': TEXT}], as TRL's GRPOTrainer passes a conversational data set "
                "(read a completion's text as completion[0]['content'])")
    if any(conv):
        return ("it got both forms: message lists for the conversational rows of the data, strs for its text "
                "rows")
    return ("it got text data: each prompt and each completion a str, as TRL's GRPOTrainer passes a text data "
            "set (message lists come only with conversational prompts)")


# --------------------------------------------------------------------------------------------- calling


def _run_coroutine(coro: Any) -> Any:
    """Run an awaitable to completion in a fresh event loop (in a helper thread if this one runs a loop)."""
    async def wrap():
        return await coro

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread (main thread or any other): the usual case
        return asyncio.run(wrap())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-fn") as pool:
        return pool.submit(asyncio.run, wrap()).result()


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(getattr(type(fn), "__call__", None)))


def _number(v: Any) -> tuple[Optional[float], str]:
    """(float value, '') for a real number (NaN for None), else (None, why not)."""
    if v is None:
        return math.nan, ""
    if isinstance(v, torch.Tensor):
        if v.ndim != 0:
            return None, f"a tensor of shape {tuple(v.shape)}, not a number"
        if v.is_complex():
            return None, f"{_short(v)} (complex tensor), not a real number"
        v = v.item()
    elif isinstance(v, np.ndarray):
        if v.ndim != 0:
            return None, f"an array of shape {v.shape}, not a number"
        v = v[()]
    if isinstance(v, np.generic):
        if v.dtype.kind not in "biuf":
            return None, f"{_short(v)} ({type(v).__name__}), not a number"
        v = v.item()
    if not isinstance(v, numbers.Real):
        return None, f"{_short(v)} ({type(v).__name__}), not a number"
    try:
        x = float(v)
    except OverflowError:
        return None, f"{_short(v)}, too large for a float"
    if not math.isfinite(x):
        return None, f"{x}, not a finite number (return None for 'not applicable')"
    return x, ""


@dataclass(frozen=True)
class RewardFunction:
    """A programmatic reward: ``name`` (the ``rewards[].name``), the function, and the spec it came from.

    ``rf(prompts, completions, columns)`` calls ``fn(prompts=..., completions=..., **columns)`` (only the
    columns it names when it has no ``**kwargs``), awaits it when async, and returns one float per completion
    (NaN for None = not applicable). Anything wrong raises ``RewardFunctionError`` naming the function.
    Pickles by spec when loaded with ``from_spec`` (the function is re-imported where it is unpickled).
    """

    name: str
    fn: Callable = field(repr=False)
    spec: str = ""
    is_async: bool = field(init=False)
    _sig: _Signature = field(init=False, repr=False, compare=False)
    _source: Optional[tuple[str, str]] = field(default=None, repr=False, compare=False)  # (spec, abs base dir)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"RewardFunction {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not self.spec:
            mod, qual = getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", None)
            object.__setattr__(self, "spec", f"{mod}:{qual}" if mod and qual else _short(self.fn, 40))
        object.__setattr__(self, "is_async", _is_async(self.fn))
        object.__setattr__(self, "_sig", _Signature.of(self.fn))

    @classmethod
    def from_spec(cls, name: str, spec: str, field: str,
                  base_dir: Optional[Union[str, os.PathLike]] = None) -> "RewardFunction":
        """``load_function(spec, field, base_dir)`` wrapped as a RewardFunction called ``name``."""
        fn = load_function(spec, field, base_dir)
        base = str(Path(base_dir).resolve()) if base_dir is not None else os.getcwd()
        return cls(name, fn, spec.strip(), _source=(spec, base))

    def __reduce__(self):
        if self._source is not None:
            return (_reload, (self.name, self.spec, self._source))
        return (RewardFunction, (self.name, self.fn, self.spec))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Data columns the function names without a default."""
        return self._sig.columns_required()

    def _error(self, msg: str, step: Optional[int]) -> RewardFunctionError:
        at = f" at step {step}" if step is not None else ""
        return RewardFunctionError(f"reward function {self.name!r} ({self.spec}){at}: {msg}", self.name, self.spec,
                                   step)

    def wants(self, name: str) -> bool:
        """Whether the function takes keyword ``name`` (by name or through **kwargs)."""
        return self._sig.accepts(name)

    def _kwargs(self, prompts: list, completions: list, columns: Mapping[str, Sequence],
                step: Optional[int], extras: Mapping[str, Any]) -> dict[str, Any]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward function {self.name!r}: {len(prompts)} prompts for {n} completions "
                             f"(repeat each prompt once per completion)")
        clash = [c for c in (*_STANDARD, *_PROVIDED) if c in columns]
        if clash:
            raise ValueError(f"reward function {self.name!r}: a data column may not be called {clash[0]!r}")
        for c, vals in columns.items():
            if len(vals) != n:
                raise ValueError(f"reward function {self.name!r}: column {c!r} has {len(vals)} entries for {n} "
                                 f"completions")
        ids = extras.get("completion_ids")
        if ids is not None and len(ids) != n:
            raise ValueError(f"reward function {self.name!r}: {len(ids)} completion_ids for {n} completions")
        missing = [c for c in self._sig.columns_required() if c not in columns]
        if missing:
            raise self._error(_missing_text(missing, list(columns), "the data"), step)
        unsent = [k for k in _PROVIDED if k in self._sig.required and extras.get(k) is None]
        if unsent:
            raise self._error(f"requires {', '.join(map(repr, unsent))}, which this call does not give (the "
                              f"learner gives completion_ids and trainer_state to every call)", step)
        kwargs = {"prompts": prompts, "completions": completions}
        kwargs.update((k, v) for k, v in columns.items() if self._sig.accepts(k))  # without **kwargs: its own
        kwargs.update((k, v) for k, v in extras.items() if v is not None and self._sig.accepts(k))
        return kwargs

    def __call__(self, prompts: list, completions: list, columns: Optional[Mapping[str, Sequence]] = None,
                 *, step: Optional[int] = None, completion_ids: Optional[Sequence[Sequence[int]]] = None,
                 trainer_state: Optional[RewardState] = None) -> list[float]:
        """One float per completion (NaN = not applicable). ``step`` only goes into error messages.

        ``prompts``/``completions``: strs (text data) or message lists (conversational data, see the module
        docstring); ``completion_ids`` and ``trainer_state`` go to a function that accepts them."""
        columns = {} if columns is None else columns
        prompts, completions = list(prompts), list(completions)
        extras = {"completion_ids": None if completion_ids is None else [list(c) for c in completion_ids],
                  "trainer_state": trainer_state}
        kwargs = self._kwargs(prompts, completions, columns, step, extras)
        try:
            out = self.fn(**kwargs)
            if inspect.isawaitable(out):
                out = _run_coroutine(out)
        except Exception as e:
            # a function written for the other form of data fails on indexing or on a str/list method
            form = (f"; {_form_text(completions)}"
                    if isinstance(e, (TypeError, KeyError, IndexError, AttributeError)) else "")
            if isinstance(e, KeyError) and e.args and e.args[0] in _TRL_EXTRAS:  # kwargs["log_metric"]
                form = f"; TRL's {e.args[0]} is not provided here"
            raise self._error(f"raised {type(e).__name__}: {e}{_where(e)}{form}", step) from e
        return self._validate(out, len(completions), step)

    def _validate(self, out: Any, n: int, step: Optional[int]) -> list[float]:
        what = f"{n} completion{'s' if n != 1 else ''}"
        if isinstance(out, (torch.Tensor, np.ndarray)):
            if out.ndim != 1:
                raise self._error(f"returned {'a tensor' if isinstance(out, torch.Tensor) else 'an array'} of "
                                  f"shape {tuple(out.shape)}; expected one value for each of {what}", step)
            out = list(out)
        elif not isinstance(out, (list, tuple)):
            raise self._error(f"returned {_short(out, 40)} ({type(out).__name__}); expected a list with one value "
                              f"for each of {what}", step)
        if len(out) != n:
            raise self._error(f"returned {len(out)} value{'s' if len(out) != 1 else ''} for {what}", step)
        values = []
        for i, v in enumerate(out):
            x, why = _number(v)
            if x is None:
                raise self._error(f"value {i} is {why}", step)
            values.append(x)
        return values


def _reload(name: str, spec: str, source: tuple[str, str]) -> RewardFunction:
    raw, base = source
    return RewardFunction.from_spec(name, raw, f"reward {name!r}", base)


def check_function(fn: RewardFunction, field: str, columns: Sequence[str]) -> None:
    """Check, without calling it, that ``fn`` can be called with the data's ``columns``; raise ConfigError.

    Catches a signature that does not take ``prompts``/``completions`` by keyword and a keyword the function
    requires that is not a column of the prompt data.
    """
    columns = list(columns)
    problem = fn._sig.problem()
    if problem:
        raise _fail(field, f"reward function {fn.name!r} ({fn.spec}) {problem}")
    clash = [c for c in (*_STANDARD, *_PROVIDED) if c in columns]
    if clash:
        raise _fail(field, f"the prompt data has a column {clash[0]!r}, which clashes with the argument reward "
                           f"function {fn.name!r} ({fn.spec}) gets; rename the column")
    missing = [c for c in fn.required_columns if c not in columns]
    if missing:
        raise _fail(field, f"reward function {fn.name!r} ({fn.spec}) "
                           f"{_missing_text(missing, columns, 'the prompt data')}")
