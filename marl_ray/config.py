"""Typed, frozen configuration of a multi-adapter PPO run.

Every knob is a field of a frozen dataclass whose help text sits in ``metadata["help"]`` (see ``opt``), in
the style of CleanRL's ``Args``. One YAML mapping maps 1:1 onto the dataclass nesting::

    model: {base: path/to/causal-lm}
    rewards: [{name: rm, path: runs/rm/adapter}]
    policies: [{name: alice, reward: rm}, {name: bob, reward: rm, reward_weight: -1.0}]
    ppo: {steps: 3}

``load_config(PPORunConfig, "run.yaml", ["ppo.steps=5", "policies[0].lr=1e-4"])`` reads it, applies the
overrides, coerces values to the annotated types and validates the whole tree; every problem is a
``ConfigError`` naming the dotted field path and the fix. ``add_config_args`` gives a CLI
``--config PATH --set KEY=VALUE`` whose ``--help`` explains every field. Validation runs when a
``PPORunConfig`` is built and in ``load_config``; a section built alone is checked by ``validate``.
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
RESERVED_NAMES = ("ref", "reference", "__base__", "default")  # role names no adapter may take
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted path of the offending field."""


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}" if path else msg)


def _join(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def opt(default: Any = MISSING, help: str = "", **bounds: Any) -> Any:
    """A field with help text. A dataclass ``default`` is used as a factory; leave ``default`` out for a
    required field. ``bounds`` (gt, ge, lt, le) are checked on validation and shown in ``--help``."""
    meta = {"help": help, **bounds}
    if isinstance(default, type) and is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


spec = dataclass(frozen=True, kw_only=True)


# ------------------------------------------------------------------------------------------ sections


@spec
class LoraSpec:
    r: int = opt(16, "LoRA rank.", ge=1)
    alpha: int = opt(32, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    dropout: float = opt(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: tuple[str, ...] = opt(("q_proj", "v_proj"), "Names of the modules LoRA wraps.")

    def _check(self, at: str) -> None:
        if not self.target_modules:
            _fail(_join(at, "target_modules"), "list at least one module name, e.g. [q_proj, v_proj]")


@spec
class ModelSpec:
    base: str = opt(help="Path or hub id of the causal LM shared by every role (policies, rewards, reference).")
    tokenizer: Optional[str] = opt(None, "Tokenizer path or hub id; null = same as model.base.")
    quantization: Literal["none", "8bit", "4bit"] = opt("none", "Load the frozen base weights quantised.")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "Floating-point dtype of the base model.")
    reference_adapter: Optional[str] = opt(None, "Frozen LoRA adapter used as the reference; null = the bare base.")
    gradient_checkpointing: Optional[bool] = opt(
        None, "Recompute decoder layers in the backward pass instead of storing their activations (less memory, "
        "about one more forward per training pass); null = on for 4/8-bit bases, off otherwise.")


def _check_name(at: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        _fail(_join(at, "name"), f"{name!r} is not a safe name; use only letters, digits, '_' and '-'")
    if name.lower() in RESERVED_NAMES:
        _fail(_join(at, "name"), f"{name!r} is a reserved role name ({', '.join(RESERVED_NAMES)}); pick another")


@spec
class RewardSpec:
    name: str = opt(help="Adapter name of this reward model; policies refer to it by this name.")
    path: str = opt(help="Folder of the saved LoRA reward adapter.")

    def _check(self, at: str) -> None:
        _check_name(at, self.name)


@spec
class PolicySpec:
    name: str = opt(help="Adapter name of this policy (letters, digits, _ and -).")
    reward: str = opt(help="Name of the reward adapter (one of rewards[].name) that scores this policy.")
    reward_weight: float = opt(1.0, "Multiplier on the reward; negative pushes the policy towards lower reward.")
    lr: float = opt(1.41e-5, "Learning rate of this policy's LoRA weights and value head.", gt=0)
    lora: LoraSpec = opt(LoraSpec, "LoRA shape of this policy's adapter.")
    init_kl_coef: float = opt(0.2, "Initial coefficient of the KL penalty against the reference.", ge=0)
    adaptive_kl: bool = opt(True, "Adapt the KL coefficient towards target_kl; false = keep init_kl_coef.")
    target_kl: float = opt(6.0, "KL target of the adaptive KL controller.", gt=0)
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller, in samples.", ge=1)
    init_from: Optional[str] = opt(None, "Saved policy folder (adapter + value head) to start from; null = fresh.")

    def _check(self, at: str) -> None:
        _check_name(at, self.name)


@spec
class GenerationSpec:
    max_new_tokens: int = opt(32, "Maximum response length in tokens.", ge=1)
    min_new_tokens: Optional[int] = opt(
        None, "With stop_at_eos: EOS cannot be sampled before this many tokens; null = max_new_tokens.", ge=0)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    top_k: int = opt(0, "Sample only from the k most likely tokens; 0 = off.", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling probability mass; 1.0 = off.", gt=0, le=1)
    stop_at_eos: bool = opt(False, "End a response at the first EOS sampled after min_new_tokens; false = EOS is "
                            "never sampled and every response has max_new_tokens tokens.")
    backend: Literal["hf", "vllm"] = opt(
        "hf", "Rollout engine of each model host: hf = HF generate on the training model; vllm = a vLLM engine "
        "over the same base with one LoRA slot per policy, synced after every update (needs the vllm extra).")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm: fraction of the GPU the engine may use.", gt=0, le=1)
    vllm_kv_cache_gib: float = opt(0.25, "vllm on CPU: KV-cache size in GiB (reserved up front).", gt=0)
    vllm_sleep: bool = opt(True, "vllm on GPU: offload the engine's weights and free its KV cache between "
                           "rollouts, so one base holds the GPU while evaluation and training run.")
    vllm_max_model_len: Optional[int] = opt(
        None, "vllm: prompt + response tokens per sequence; null = the base's max_position_embeddings.", ge=1)

    def _check(self, at: str) -> None:
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            _fail(_join(at, "min_new_tokens"), f"{self.min_new_tokens} is larger than "
                  f"{_join(at, 'max_new_tokens')} {self.max_new_tokens}; lower it or set it to null")


@spec
class PPOSpec:
    steps: int = opt(10, "Number of PPO steps (a rollout batch per policy, then its updates).", ge=1)
    batch_size: int = opt(16, "Prompts per policy per step.", ge=1)
    mini_batch_size: int = opt(8, "Samples per gradient step; must divide batch_size.", ge=1)
    ppo_epochs: int = opt(4, "Optimisation passes over each rollout batch.", ge=1)
    micro_batch_size: Optional[int] = opt(
        None, "Rows per forward/backward pass on a host: a minibatch shard is run in chunks of this many "
        "rows and their gradients summed (the same update; activation memory in proportion to it). "
        "null = the whole shard in one pass.", ge=1)
    gamma: float = opt(1.0, "Discount factor.", gt=0, le=1)
    lam: float = opt(0.95, "GAE lambda.", gt=0, le=1)
    cliprange: float = opt(0.2, "Clip range of the policy probability ratio.", gt=0)
    cliprange_value: float = opt(0.2, "Clip range of the value prediction around the rollout values.", gt=0)
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.", ge=0)
    whiten_advantages: bool = opt(True, "Normalise advantages to zero mean and unit variance per batch.")
    max_grad_norm: Optional[float] = opt(1.0, "Clip gradients to this global norm; null = no clipping.", gt=0)
    max_nonfinite_steps: int = opt(
        3, "Stop (after a checkpoint of the last good state) when a policy's update is skipped for NaN/inf "
        "this many steps in a row.", ge=1)
    kl_penalty: Literal["kl", "abs", "mse"] = opt("kl", "KL estimate: logp - logp_ref, its abs, or its square / 2.")
    rollout_logprobs: Optional[bool] = opt(
        None, "Take the PPO old logprobs and values from the decode steps (marl-ray's decode loop computes "
        "them anyway) instead of a policy pass when scoring: a third less scoring work. They agree with "
        "the scoring pass to rounding: about 3e-7 per token in fp32, 3e-3 in bf16, so in bf16 the PPO "
        "ratio starts within 2% of 1 instead of at exactly 1, and the KL at the first step is that "
        "noise instead of 0 (the demo in bf16 learned as much either way over two seeds). null = on for a "
        "full-precision base (fp32 or bf16), off for a 4/8-bit one. Rollouts from vLLM or HF generate "
        "are always scored by a pass.")

    def _check(self, at: str) -> None:
        if self.batch_size % self.mini_batch_size:
            _fail(_join(at, "mini_batch_size"), f"{self.mini_batch_size} does not divide "
                  f"{_join(at, 'batch_size')} {self.batch_size}; pick a divisor")


@spec
class ClusterSpec:
    runtime: Literal["ray", "inprocess"] = opt(
        "ray", "ray = model hosts and rollout workers are Ray actors; inprocess = the same objects in this "
        "process (one host; for debugging and for measuring Ray's overhead).")
    address: Optional[str] = opt(None, "Ray address: null = a local Ray on 127.0.0.1; auto = the running cluster.")
    num_hosts: Optional[int] = opt(None, "Number of model-host actors; null = one per alive node.", ge=1)
    hosts_per_node: int = opt(1, "Model-host actors placed on each node.", ge=1)
    host_num_cpus: float = opt(1.0, "CPUs Ray reserves for each model host.", ge=0)
    host_num_gpus: float = opt(0.0, "GPUs Ray reserves for each model host (a fraction shares a GPU).", ge=0)
    max_restarts: int = opt(3, "Ray restarts of a model host or rollout worker that dies; the learner then "
                            "restores it and redoes the step.", ge=0)
    rollout_workers: int = opt(2, "Number of rollout workers generating responses in parallel.", ge=1)
    placement: Literal["spread", "node_affinity"] = opt("spread", "Host placement: Ray SPREAD or pinned to nodes.")


@spec
class DataSpec:
    prompts: str = opt("embedded", "embedded = the built-in domain; else a JSONL file with a \"prompt\" field.")
    max_prompt_tokens: int = opt(16, "Prompts are truncated to this many tokens.", ge=1)
    seed: int = opt(0, "Seed of the prompt order.", ge=0)


@spec
class RunSpec:
    out_dir: str = opt("runs/ppo", "Output folder for checkpoints, logs and the resolved config.")
    seed: int = opt(0, "Global random seed.", ge=0)
    log_every: int = opt(1, "Log metrics every N steps.", ge=1)
    save_every: int = opt(0, "Save a checkpoint every N steps; 0 = only at the end.", ge=0)
    resume: Optional[str] = opt(None, "Resume from a checkpoint: 'latest' (of out_dir) or a checkpoint folder.")
    keep_last: int = opt(2, "Number of most recent checkpoints to keep.", ge=1)
    tensorboard: bool = opt(True, "Write TensorBoard event files into out_dir.")
    progress: bool = opt(True, "Show a progress bar.")


@spec
class PPORunConfig:
    model: ModelSpec = opt(help="The shared base model.")
    rewards: tuple[RewardSpec, ...] = opt((), "Reward adapters on the shared base.")
    policies: tuple[PolicySpec, ...] = opt((), "Policy adapters trained with PPO, each with its own value head.")
    generation: GenerationSpec = opt(GenerationSpec, "How responses are sampled.")
    ppo: PPOSpec = opt(PPOSpec, "PPO optimisation.")
    cluster: ClusterSpec = opt(ClusterSpec, "Ray cluster and actor placement.")
    data: DataSpec = opt(DataSpec, "Prompt data.")
    run: RunSpec = opt(RunSpec, "Outputs, logging and checkpoints.")

    def __post_init__(self) -> None:
        validate(self)

    def _check(self, at: str) -> None:
        if not self.policies:
            _fail(_join(at, "policies"), "at least one policy is required, e.g. [{name: p0, reward: rm}]")
        used: dict[str, str] = {}
        for kind, specs in (("rewards", self.rewards), ("policies", self.policies)):
            for i, s in enumerate(specs):
                path = _join(at, f"{kind}[{i}]")
                if s.name in used:
                    _fail(f"{path}.name", f"{s.name!r} is already the name of {used[s.name]}; names must be unique")
                used[s.name] = path
        rewards = [r.name for r in self.rewards]
        for i, p in enumerate(self.policies):
            if p.reward not in rewards:
                _fail(_join(at, f"policies[{i}].reward"),
                      f"{p.reward!r} is not one of the reward adapters {rewards}; add it under rewards or fix the name")


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
        if choices and v is not None and v not in choices:
            _fail(path, f"{v!r} is not one of {', '.join(choices)}")
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
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, v, path)
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


def _build(cls: type[T], data: Any, path: str = "") -> T:
    if not isinstance(data, Mapping):
        _fail(path, f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(_join(path, str(key)), f"unknown key; {hint}valid keys: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(_hints(cls)[name], data[name], _join(path, name))
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
