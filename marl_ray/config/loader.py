"""Loading a config: YAML < ``--set`` overrides, coercion, validation, and the CLI's ``--help``.

``load_config(PPORunConfig, "run.yaml", ["ppo.steps=5", "policies[0].lr=1e-4"])`` reads the file,
applies the overrides, coerces values to the annotated types and validates the whole tree; every
problem is a ``ConfigError`` naming the dotted field path and the fix. ``add_config_args`` gives a
CLI ``--config PATH --set KEY=VALUE`` whose ``--help`` explains every field. The machinery is
generic over any tree of ``spec`` dataclasses (the stages' configs use it too); the RL run's
sections are in ``schema.py``.

Why our own ~300 lines and not a library: pydantic would take over the
coercion and the bounds (~80 lines) but not the YAML + ``--set a.b[0].c=V`` layering or the
``--help`` listing, and its errors (location tuples, its own wording) would need as much code again
to read like ours; tyro makes a CLI from dataclasses but has no YAML layer and no overrides into a
list of sections (``policies[1].lr``); OmegaConf merges YAML and dot-lists but checks no bounds and
no ``Literal`` choices; draccus is little used. Each would add a dependency and take the error
texts out of our hands without removing the code that users see.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import operator
import re
import textwrap
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted path of the offending field."""


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}" if path else msg)


def _join(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def opt(default: Any = MISSING, help: str = "", **bounds: Any) -> Any:
    """A field with help text. A dataclass ``default`` is used as a factory; leave ``default`` out for a
    required field. ``bounds`` (gt, ge, lt, le) are checked on validation and shown in ``--help``;
    ``one_or_many=True`` lets a list field be given as one string."""
    meta = {"help": help, **bounds}
    if isinstance(default, type) and is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


spec = dataclass(frozen=True, kw_only=True)


# ------------------------------------------------------------------------------ types and validation


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any, bounds: str = "") -> str:
    args = get_args(tp)
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _type_name(a, bounds) for a in args)
    if get_origin(tp) is Literal:
        return "|".join(map(str, args))
    if get_origin(tp) is tuple:
        return f"list of {_type_name(args[0])}"
    return f"{tp.__name__} {bounds}".strip()


def _bounds_text(meta: Mapping[str, Any]) -> str:
    return " and ".join(f"{sym} {meta[k]}" for k, (sym, _) in _BOUNDS.items() if k in meta)


def _matches(tp: Any, v: Any) -> bool:
    """Strict isinstance against a type hint (for already-built objects)."""
    if _is_union(tp):
        return any(_matches(a, v) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return True  # membership is checked separately, with a clearer message
    if get_origin(tp) is tuple:
        return isinstance(v, tuple) and all(_matches(get_args(tp)[0], x) for x in v)
    if tp in (int, float):
        return isinstance(v, int if tp is int else (int, float)) and not isinstance(v, bool)
    return isinstance(v, tp)


def validate(obj: Any, at: str = "") -> None:
    """Check types, choices, bounds and cross-field rules of a config tree; raise ConfigError."""
    for f in fields(obj):
        path, v, tp = _join(at, f.name), getattr(obj, f.name), _hints(type(obj))[f.name]
        if not _matches(tp, v):
            _fail(path, f"expected {_type_name(tp)}, got {type(v).__name__} {v!r}")
        choices = next((get_args(a) for a in (tp, *get_args(tp)) if get_origin(a) is Literal), None)
        others = [a for a in get_args(tp) if a is not type(None) and get_origin(a) is not Literal] if _is_union(tp) else []
        if others and v is None and type(None) not in get_args(tp):
            _fail(path, f"expected {_type_name(tp)}, got null")
        if choices and v is not None and v not in choices and not any(_matches(a, v) for a in others):
            also = f" or a {' or '.join(_type_name(a) for a in others)}" if others else ""
            _fail(path, f"{v!r} is not one of {', '.join(map(str, choices))}{also}")
        if isinstance(v, str) and not v.strip():
            _fail(path, "must not be empty (use null where the field allows it)")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not all(test(v, f.metadata[k]) for k, (_, test) in _BOUNDS.items() if k in f.metadata):
                _fail(path, f"{v!r} must be {_bounds_text(f.metadata)}")
        if is_dataclass(v):
            validate(v, path)
        for i, x in enumerate(v if isinstance(v, tuple) else ()):
            if is_dataclass(x):
                validate(x, f"{path}[{i}]")
            elif isinstance(x, str) and not x.strip():
                _fail(f"{path}[{i}]", "must not be empty")
    if hasattr(obj, "_check"):
        obj._check(at)


# ------------------------------------------------------------------------------------------ building


def _coerce(tp: Any, v: Any, path: str) -> Any:
    """Turn a plain YAML value into the annotated type (lenient only where YAML is ambiguous)."""
    args, got = get_args(tp), f"got {type(v).__name__} {v!r}"
    if _is_union(tp):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. bool or Literal["auto"]: the value as it is, validate() checks it
            return v
        return _coerce(inner[0], v, path)
    if get_origin(tp) is Literal:
        return v  # validate() reports a value outside the choices
    if get_origin(tp) is tuple:
        if not isinstance(v, (list, tuple)):
            _fail(path, f"expected a list of {_type_name(args[0])}, {got}")
        return tuple(_coerce(args[0], x, f"{path}[{i}]") for i, x in enumerate(v))
    if is_dataclass(tp):
        return _build(tp, v, path)
    if tp is int and not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and v.is_integer()):
        return int(v)
    if tp is float and isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:
            return float(v)  # a str here is YAML 1.1 reading "1e-4" (no dot) as a string
        except ValueError:
            pass
    if tp in (bool, str) and isinstance(v, tp):
        return v
    quoted = isinstance(v, str) and re.fullmatch(r"[-+]?[\d.]+([eE][-+]?\d+)?|true|false", v.lower())
    hint = " (write it without quotes)" if quoted else " (quote it)" if tp is str else ""
    _fail(path, f"expected {'a string' if tp is str else tp.__name__}, {got}{hint}")


#: Keys an earlier version read, and why they are gone (an old config gets this instead of "unknown key").
REMOVED = {
    "cluster.keep_rows": "rows always stay on the host that sampled them",
    "cluster.grad_sync": "several model hosts always sum gradients among themselves (the collective)",
}


def _build(cls: type[T], data: Any, path: str = "") -> T:
    if not isinstance(data, Mapping):
        _fail(path, f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            if _join(path, str(key)) in REMOVED:
                _fail(_join(path, str(key)), f"removed: {REMOVED[_join(path, str(key))]}; delete the key")
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(_join(path, str(key)), f"unknown key; {hint}valid keys: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            value = data[name]
            if f.metadata.get("one_or_many") and isinstance(value, str):  # one name where a list may stand
                value = [value]
            kwargs[name] = _coerce(_hints(cls)[name], value, _join(path, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            _fail(_join(path, name), f"required field is missing ({f.metadata.get('help', '')})")
    return cls(**kwargs)


def _read_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        ctx = f" ({ctx} at line {cmark.line + 1})" if ctx and cmark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}{ctx}") from e
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data or {}


def _merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}
    return over


_KEY_RE = re.compile(r"[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*")


def _apply_override(data: dict, item: str) -> None:
    """Set ``a.b[0].c=VALUE`` (VALUE parsed as YAML) in the plain dict; ``[len]`` appends to a list."""
    key, sep, raw = (s.strip() for s in item.partition("="))
    if not sep or not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with KEY like ppo.steps or policies[0].lr")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: override value {raw!r} is not valid YAML ({e})") from e
    tokens = [name or int(idx) for name, idx in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", key)]
    node, path = data, ""
    for tok, nxt in zip(tokens, tokens[1:] + [None]):
        here = _join(path, tok) if isinstance(tok, str) else f"{path}[{tok}]"
        if not isinstance(node, dict if isinstance(tok, str) else list):
            _fail(path, f"is a {type(node).__name__}, so {here} cannot be set")
        if isinstance(tok, int) and tok > len(node):
            _fail(here, f"index out of range: the list has {len(node)} items (use [{len(node)}] to append)")
        if isinstance(tok, int) and tok == len(node):
            node.append(None)
        if nxt is None:
            node[tok] = value
            return
        child = node.get(tok) if isinstance(node, dict) else node[tok]
        if child is None:
            if isinstance(nxt, int):
                _fail(here, "no list to index here; give the whole list in the YAML or as one value")
            node[tok] = child = {}
        node, path = child, here


def load_config(cls: type[T], path: Optional[str] = None, overrides: Sequence[str] = (),
                base: Optional[dict] = None) -> T:
    """Build ``cls`` from ``base`` (defaults) < the YAML file at ``path`` < ``overrides`` (``a.b[0].c=VALUE``)."""
    data = _merge(copy.deepcopy(base or {}), _read_yaml(path) if path else {})
    for item in overrides:
        _apply_override(data, item)
    cfg = _build(cls, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain, YAML-serialisable form (tuples become lists); ``load_config(cls, base=to_dict(cfg)) == cfg``."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------- CLI


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_fmt, v)) + "]"
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return str(v)


def _field_lines(cls: type, at: str, width: int) -> list[str]:
    lines, sections = [], []
    for f in fields(cls):
        tp, path, help_ = _hints(cls)[f.name], _join(at, f.name), f.metadata.get("help", "")
        item = get_args(tp)[0] if get_origin(tp) is tuple else None
        if is_dataclass(tp) or is_dataclass(item):  # a section: listed after the plain fields
            sub_at = f"{path}[i]" if item is not None else path
            sections += ["", f"{sub_at}: {help_}", *_field_lines(item or tp, sub_at, width)]
            continue
        default = "required" if f.default is MISSING else f"default {_fmt(f.default)}"
        text = f"{path} ({_type_name(tp, _bounds_text(f.metadata))}, {default}): {help_}"
        lines.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="      ",
                                   break_long_words=False, break_on_hyphens=False))
    return lines + sections


def config_help(cls: type, width: int = 100) -> str:
    """Every field of ``cls`` as ``section.field (type, default): help``, grouped by section."""
    head = "Config fields (set them in the --config YAML or with --set KEY=VALUE, e.g. --set ppo.steps=3):"
    return head + "\n" + "\n".join(_field_lines(cls, "", width)).lstrip("\n")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE``; list every field of ``cls`` in the epilog
    (the parser's formatter is switched to one that keeps the epilog's line breaks)."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"YAML file mapping onto {cls.__name__} (sections and fields listed below)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one field, e.g. --set ppo.steps=3 --set policies[0].lr=1e-4 "
                             "(VALUE is parsed as YAML; repeatable; applied after --config)")
    if not issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = type("ConfigHelpFormatter",
                                      (argparse.RawDescriptionHelpFormatter, parser.formatter_class), {})
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + config_help(cls)
    return parser


def config_from_args(args: argparse.Namespace, cls: type[T], base: Optional[dict] = None) -> T:
    """The config described by ``--config`` and ``--set`` of parsed ``args`` (``base``: defaults under both)."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "set", None) or (), base=base)
