"""Prompt sources: where an RL run's prompts (and each prompt's other fields) come from.

`data.prompts` is one of
- `embedded`: the built-in movie-review domain's openings (`data/domain.py`);
- a file: JSONL (`.jsonl`), JSON (`.json`: a list of rows, or {"data": rows}), CSV (`.csv`) or
  Parquet (`.parquet`);
- a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `data.split`
  picks the split);
- otherwise a `datasets` hub name, loaded with `datasets.load_dataset(name, split=data.split)`
  (needs the hub; never used by the tests).

A row's prompt is its `data.prompt_field` (default `prompt`): a text, a list of token ids (the
field `input_ids`, used as given, and before a `prompt` text when a row has both), or a conversation (a list of {role, content} messages,
rendered with the tokenizer's chat template by the rollout worker). Every other field of the row
travels with the prompt and reaches reward functions as a keyword column.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")


class PromptDataError(ValueError):
    """A prompt source that cannot be read or has no usable prompts; the message says which."""


def _rows_of_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        from marl_ray.data.domain import read_jsonl

        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PromptDataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise PromptDataError(f"{path}: expected a list of rows (or {{\"data\": [rows]}}), got {type(data).__name__}")
        return data
    if suffix in (".csv", ".parquet"):
        import datasets

        ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        return [dict(r) for r in ds]
    raise PromptDataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _rows_of_folder(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001  (datasets raises several kinds)
        raise PromptDataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PromptDataError(f"{path}: no split {split!r}; it has {sorted(ds)} (set data.split)")
        ds = ds[split]
    return [dict(r) for r in ds]


def _rows_of_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise PromptDataError(f"{name!r} is neither a local file or folder nor a data set that loads from the hub "
                              f"({type(e).__name__}: {e})") from None
    return [dict(r) for r in ds]


def check_conversation(messages, where: str) -> None:
    """A conversation is a non-empty list of {role, content} with known roles."""
    if not messages or not isinstance(messages, list):
        raise PromptDataError(f"{where}: a conversation must be a non-empty list of {{role, content}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptDataError(f"{where}: message {k} is not a {{role, content}} mapping: {str(m)[:80]}")
        if m["role"] not in ROLES:
            raise PromptDataError(f"{where}: message {k} has the unknown role {m['role']!r}; roles: {', '.join(ROLES)}")


def load_rows(source: str, split: str = "train", prompt_field: str = "prompt", seed: int = 0,
              n: int = 20000) -> tuple[list, list[dict]]:
    """(prompts, columns) of a prompt source (see the module docstring). A prompt is a text, a list of
    token ids, or a conversation (a list of messages); columns[i] are row i's other fields."""
    if source == "embedded":
        from marl_ray.data.domain import prompts

        texts = prompts(n, seed=seed, split="train")
        return texts, [{} for _ in texts]
    path = Path(source).expanduser()
    if path.is_file():
        rows = _rows_of_file(path)
    elif path.is_dir():
        rows = _rows_of_folder(path, split)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        raise PromptDataError(f"{source!r} does not exist")
    else:
        rows = _rows_of_hub(source, split)
    if not rows:
        raise PromptDataError(f"{source}: no rows" + ("" if path.is_file() else f" in split {split!r}"))
    out, columns = [], []
    for i, r in enumerate(rows, 1):
        where = f"{source}: row {i}"
        if not isinstance(r, dict):
            raise PromptDataError(f"{where} is not a mapping of fields")
        if isinstance(r.get("input_ids"), list) and (prompt_field == "prompt" or prompt_field not in r):
            out.append([int(t) for t in r["input_ids"]])
            used = "input_ids"
        elif prompt_field in r:
            p = r[prompt_field]
            if isinstance(p, list):
                check_conversation(p, where)
            elif not isinstance(p, str):
                raise PromptDataError(f"{where}: {prompt_field!r} is a {type(p).__name__}, not a text or a conversation")
            out.append(p)
            used = prompt_field
        elif prompt_field == "prompt" and isinstance(r.get("messages"), list):
            check_conversation(r["messages"], where)
            out.append(r["messages"])
            used = "messages"
        else:
            raise PromptDataError(f"{where} has no {prompt_field!r} field (nor 'input_ids'); its fields are "
                                  f"{sorted(r)}: set data.prompt_field to the one that holds the prompt")
        columns.append({k: v for k, v in r.items() if k != used})
    return out, columns


def is_conversation(prompt) -> bool:
    """A prompt that is a list of {role, content} messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids the tokenizer's chat template puts right after an assistant's message ("<|im_end|>",
    "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", ...): completions of a conversation stop there as
    well as at EOS. Found by rendering a conversation with a marker as the assistant's message and reading
    the first token after it, kept only when it is a special or added token (a template that ends a turn
    with plain text has none). [] without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "MARLRAYENDOFTURNPROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that refuses this conversation: nothing to learn from it
        return []
    if marker not in text:
        return []
    rest = text.split(marker, 1)[1]
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest.strip() else []
    if not ids:
        return []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids[0] in special else []


def held_out(prompt, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out share `fraction` (data.eval_fraction): a fixed function of
    the prompt alone (crc32 of its JSON), so the rollout workers and the evaluation agree without talking."""
    if fraction <= 0:
        return False
    import zlib

    key = json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return zlib.crc32(key) % 100_000 < fraction * 100_000


def eval_rows(data) -> tuple[list, list[dict]] | None:
    """The held-out (prompts, columns) of a run's data section (`DataSpec`), at most data.eval_size of
    them, or None when it has none: data.eval_prompts (any form data.prompts takes; "embedded" = the
    built-in domain's eval split), or the data.eval_fraction share of data.prompts."""
    if data.eval_prompts is not None:
        if data.eval_prompts == "embedded":
            from marl_ray.data.domain import prompts

            texts = prompts(data.eval_size, seed=data.seed, split="eval", unique=True)
            return texts, [{} for _ in texts]
        prompts_, columns = load_rows(data.eval_prompts, split=data.split, prompt_field=data.prompt_field)
        return prompts_[:data.eval_size], columns[:data.eval_size]
    if data.eval_fraction > 0:
        prompts_, columns = load_rows(data.prompts, split=data.split, prompt_field=data.prompt_field, seed=data.seed)
        keep = [i for i, p in enumerate(prompts_) if held_out(p, data.eval_fraction)]
        if not keep:
            raise PromptDataError(f"data.eval_fraction {data.eval_fraction} of {data.prompts} holds out no prompt "
                                  f"(it has {len(prompts_)}): raise it or give data.eval_prompts")
        keep = keep[:data.eval_size]
        return [prompts_[i] for i in keep], [columns[i] for i in keep]
    return None
