"""The environment of an episode: user code named like a reward function, one instance per episode.

An environment is a class named "pkg.module:Class" or "path/to/file.py:Class" (episodes.environment),
built with no arguments, one instance per episode, and reset from a data row. TRL's conventions
(GRPOTrainer's environment_factory) hold, so such a class runs here unchanged with one policy:

- ``reset(**row)``: the row's fields (its prompt under ``prompt``, the other columns by name); may
  return an observation text, appended to the prompt's last message;
- its public methods are tools: their JSON schemas (transformers' get_json_schema: type hints and a
  docstring with an Args section) are rendered by the chat template (``tools=``), a tool call of the
  model's completion runs the method, and its result goes back as a ``tool`` message;
- ``get_reward()`` -> float, once the episode is over.

For several actors, all optional:

- ``roles``: the role names (a list; default one role, ``assistant``);
- ``next_role()``: who acts next, None when the episode is over (default, one role: the role acts while
  its last message called tools; a turn that calls tools is always continued by the same role);
- ``step(role, message)``: told each turn's message (a dict: role "assistant", content, tool_calls);
  may return a text, appended to the shared conversation as a ``user`` message;
- ``view(role)``: the message list that role sees (default: the shared conversation, with the role's own
  messages as ``assistant`` and its tool results, other roles' messages as ``user``, others' tool
  results left out); it may only grow;
- ``rewards()`` -> {role: float} (default: ``get_reward()`` for the one role).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from marl_ray.config import ConfigError
from marl_ray.train.rewards import _is_file_spec, _load_file, _load_module

DEFAULT_ROLE = "assistant"
# the extension's names and TRL's: never tools
RESERVED = ("reset", "get_reward", "roles", "next_role", "view", "rewards", "step")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _fail(field_: str, msg: str) -> ConfigError:
    return ConfigError(f"{field_}: {msg}")


@dataclass
class Environment:
    """An environment class, checked: its roles, tools (name -> JSON schema) and optional hooks."""

    cls: type
    spec: str
    roles: tuple[str, ...]
    tools: dict[str, dict] = field(default_factory=dict)  # tool name -> schema (in method order)

    @property
    def schemas(self) -> list[dict]:
        return list(self.tools.values())

    def has(self, name: str) -> bool:
        return callable(getattr(self.cls, name, None))

    def make(self):
        return self.cls()


def load_environment(spec: str, field_: str = "episodes.environment", base_dir=None) -> Environment:
    """Import and check an environment class ("pkg.mod:Class" or "file.py:Class"). ConfigError naming
    `field_` when it cannot be imported, is not a class, lacks reset, or a tool has no readable schema."""
    text = spec.strip()
    module_text, sep, attr = text.rpartition(":")
    if not sep or not module_text or not attr.strip():
        raise _fail(field_, f"{spec!r}: write 'module:Class' or 'path/to/file.py:Class'")
    module = _load_file(module_text, field_, base_dir) if _is_file_spec(module_text) else _load_module(module_text,
                                                                                                       field_)
    cls = getattr(module, attr.strip(), None)
    if cls is None:
        classes = [k for k, v in vars(module).items() if inspect.isclass(v) and not k.startswith("_")]
        raise _fail(field_, f"{module_text} has no {attr.strip()!r}; its classes: {', '.join(classes) or 'none'}")
    if not inspect.isclass(cls):
        raise _fail(field_, f"{text} is a {type(cls).__name__}, not a class (an environment is a class, one "
                    "instance per episode)")
    if not callable(getattr(cls, "reset", None)):
        raise _fail(field_, f"{text} has no reset method: an environment defines reset(**row) (TRL's convention)")
    roles = getattr(cls, "roles", None)
    if roles is None:
        roles = (DEFAULT_ROLE,)
    elif callable(roles) or isinstance(roles, (str, bytes)) or not roles or \
            not all(isinstance(r, str) and r for r in roles):
        raise _fail(field_, f"{text}.roles must be a non-empty list of role names, got {roles!r}")
    roles = tuple(roles)
    if len(set(roles)) != len(roles):
        raise _fail(field_, f"{text}.roles {list(roles)} names a role twice")
    if len(roles) > 1:
        for need in ("next_role", "rewards"):
            if not callable(getattr(cls, need, None)):
                raise _fail(field_, f"{text} has several roles {list(roles)} but no {need}(): an environment of "
                            "several roles says who acts next (next_role) and rewards each role (rewards)")
    if not callable(getattr(cls, "get_reward", None)) and not callable(getattr(cls, "rewards", None)):
        raise _fail(field_, f"{text} has no get_reward() (nor rewards()): the episode's reward comes from it")
    from transformers.utils import get_json_schema

    tools = {}
    for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
        if name.startswith("_") or name in RESERVED:
            continue
        try:
            tools[name] = get_json_schema(fn)
        except Exception as e:  # noqa: BLE001  (transformers raises its own kinds)
            raise _fail(field_, f"{text}.{name} is a tool (a public method) but has no usable schema: {e}. Give it "
                        "type hints and a docstring with an Args section, or make it private (_name)") from None
    return Environment(cls, text, roles, tools)


def check_template(tokenizer, env: Environment, field_: str = "episodes.environment"):
    """Episodes speak through the chat template: it must exist, and render the tools when there are any."""
    if not getattr(tokenizer, "chat_template", None):
        raise _fail(field_, "episodes are conversations, but the tokenizer has no chat template: give it one "
                    "(tokenizer.chat_template)")
    if not env.tools:
        return
    probe = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=env.schemas, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001
        raise _fail(field_, f"{env.spec} has tools {list(env.tools)}, but the chat template fails to render tools "
                    f"({type(e).__name__}: {e}); use a tokenizer whose template takes tools=") from None
    if not all(name in text for name in env.tools):
        raise _fail(field_, f"{env.spec} has tools {list(env.tools)}, but the tokenizer's chat template does not "
                    "render tools (tools= leaves no trace in the prompt); use a template that does, e.g. Qwen2.5's")


# ------------------------------------------------------------------------------------- tool calls
def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the content without its tool calls, the tool calls) of a completion, as the chat templates that
    take tools= write them (Qwen2/2.5/3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
    A call that is not valid JSON with a name is left in the content (it is no call)."""
    calls, kept = [], []
    last = 0
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                continue
        if not isinstance(args, dict):
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"type": "function", "function": {"name": obj["name"], "arguments": args}})
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def run_tool(env_obj, env: Environment, call: dict) -> tuple[str, Any, bool]:
    """(tool name, result, ok) of one call on the episode's environment: an unknown tool or one that
    raises gives {"error": ...} (as TRL), never stops the run."""
    fn_spec = call.get("function", {})
    name = fn_spec.get("name", "unknown")
    if name not in env.tools:
        return name, {"error": f"Tool {name} not found."}, False
    try:
        out = getattr(env_obj, name)(**fn_spec.get("arguments", {}))
        if inspect.iscoroutine(out):
            out = asyncio.run(out)
        return name, out, True
    except Exception as e:  # noqa: BLE001  (the tool's failure is the model's feedback)
        return name, {"error": str(e)}, False


def reward_of(env_obj, env: Environment) -> dict[str, float]:
    """Each role's reward as the environment stands: rewards(), or get_reward() of the one role."""
    if env.has("rewards"):
        got = env_obj.rewards()
        if not isinstance(got, dict):
            raise TypeError(f"{env.spec}.rewards() returned {type(got).__name__}, not a {{role: float}} dict")
        missing = [r for r in env.roles if r not in got]
        if missing:
            raise TypeError(f"{env.spec}.rewards() has no reward for roles {missing}")
        return {r: float(got[r]) for r in env.roles}
    out = env_obj.get_reward()
    if inspect.iscoroutine(out):
        out = asyncio.run(out)
    return {env.roles[0]: float(out)}


def default_view(shared: list[tuple[Any, dict]], role: str) -> list[dict]:
    """What `role` sees of the shared conversation (list of (author, message); author None = the data's or
    the environment's): its own messages and tool results as they are, other roles' messages as user."""
    out = []
    for who, m in shared:
        if who is None or who == role:
            out.append(m)
        elif m["role"] == "assistant":
            out.append({"role": "user", "content": m.get("content") or ""})
    return out


def callable_attr(obj, name: str) -> Callable | None:
    fn = getattr(obj, name, None)
    return fn if callable(fn) else None
