"""RolloutWorker: owns a shard of the prompt stream, tokenizes it and streams it to a host.

Holds a tokenizer and its position in the stream, never model weights, and relays no tensors
(the host's samples go to the learner directly). The position is explicit state (`state` /
`set_state`) so a checkpoint can resume the stream exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from marl_ray.data.prompts import end_of_turn_ids, held_out, is_conversation
from marl_ray.runtime.faults import Faults
from marl_ray.runtime.protocol import RolloutPart

log = logging.getLogger(__name__)


def load_prompts(source: str, seed: int = 0, n: int = 20000, split: str = "train",
                 prompt_field: str = "prompt") -> list:
    """The prompts of a prompt source (`data/prompts.py`): texts, token id lists or conversations."""
    return load_prompt_rows(source, seed, n, split, prompt_field)[0]


def load_prompt_rows(source: str, seed: int = 0, n: int = 20000, split: str = "train",
                     prompt_field: str = "prompt") -> tuple[list, list[dict]]:
    """(prompts, columns): as `load_prompts`, and each row's other fields (e.g. an `answer` that a
    reward function checks completions against); the embedded domain has none."""
    from marl_ray.data.prompts import load_rows

    return load_rows(source, split=split, prompt_field=prompt_field, seed=seed, n=n)


class RolloutWorker:
    """Shard `worker_index` of `num_workers` of a prompt stream (prompt i belongs to shard i % num_workers)."""

    def __init__(self, tokenizer: str, prompts: str, worker_index: int, num_workers: int,
                 max_prompt_tokens: int, seed: int = 0, split: str = "train", prompt_field: str = "prompt",
                 eval_fraction: float = 0.0):
        from transformers import AutoTokenizer

        from marl_ray.model.gguf import resolve_base

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_base(tokenizer))  # a .gguf: its converted folder
        texts, columns = load_prompt_rows(prompts, seed=seed, split=split, prompt_field=prompt_field)
        if eval_fraction > 0:  # the held-out share (data.eval_fraction) is never trained on
            kept = [i for i, t in enumerate(texts) if not held_out(t, eval_fraction)]
            if not kept:
                raise ValueError(f"data.eval_fraction {eval_fraction} holds out every prompt of {prompts}")
            texts, columns = [texts[i] for i in kept], [columns[i] for i in kept]
        self.ids = [i for i in range(len(texts)) if i % num_workers == worker_index]
        self.texts = {i: texts[i] for i in self.ids}
        self.columns = {i: columns[i] for i in self.ids}
        self.max_prompt_tokens = max_prompt_tokens
        self.worker_index = worker_index
        self.faults = Faults()  # named points where a test makes this process die (runtime/faults.py)
        self.position = 0  # index into self.ids of the next prompt to hand out
        self.epoch = 0  # completed passes over the shard
        self.truncated = 0
        self.skipped_empty = 0
        # a conversation's completion also ends at the chat template's end of turn
        self.stop_token_ids = (tuple(end_of_turn_ids(self.tokenizer))
                               if any(is_conversation(t) for t in self.texts.values()) else ())

    def _text(self, prompt) -> str | None:
        """A prompt as reward functions see it: the text, a conversation rendered, None for token ids."""
        if isinstance(prompt, str):
            return prompt
        if is_conversation(prompt):
            return self.render(prompt)
        return None

    def arm_fault(self, point: str, after: int = 0):
        """Die (SIGKILL) at `point` on its `after`-th next pass: for tests (runtime/faults.py)."""
        self.faults.arm(point, after)

    def pid(self) -> int:
        """This process's id: a worker Ray restarted has another (the learner checks it each step)."""
        return os.getpid()

    def state(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def set_state(self, state: dict):
        self.position, self.epoch = int(state["position"]), int(state["epoch"])

    def _encode(self, text) -> list[int] | None:
        if is_conversation(text):
            ids = self.tokenizer(self.render(text), add_special_tokens=False)["input_ids"]
        elif isinstance(text, list):  # pre-tokenized
            ids = list(text)
            if not ids:
                return None
        else:
            if not text.strip():
                return None
            ids = self.tokenizer(text)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            # Keep the end: it is what the response continues.
            self.truncated += 1
            if self.truncated <= 3:
                log.warning("prompt of %d tokens truncated to its last %d", len(ids), self.max_prompt_tokens)
            ids = ids[-self.max_prompt_tokens:]
        return ids

    def take(self, n: int) -> list[tuple[int, list[int]]]:
        """The next n (prompt id, token ids) of this shard; wraps around (a new epoch) at its end."""
        out = []
        guard = 0
        while len(out) < n:
            if self.position >= len(self.ids):
                self.position, self.epoch = 0, self.epoch + 1
            pid = self.ids[self.position]
            self.position += 1
            ids = self._encode(self.texts[pid])
            guard += 1
            if ids is None:
                self.skipped_empty += 1
                if guard > 2 * len(self.ids) + n:
                    raise ValueError("every prompt of this shard is empty")
                continue
            out.append((pid, ids))
        return out

    def rollout(self, host, n: int, policies: list[str], settings, seed: int,
                keep: tuple[str, int] | None = None) -> RolloutPart:
        """Take n prompts and have `host` answer each under every policy in `policies` (N = n * len(policies)
        rows; a policy named G times answers each prompt G times: a group).

        The samples are returned as the host's result (a reference to it on Ray): they go from the
        host to whoever reads them, not through this worker. keep = (learner token, rollout id): the
        host also keeps the rows, under this worker's index, to score and train on them there."""
        self.faults.at("rollout")
        taken = self.take(n)
        rows = [(pid, ids, p) for pid, ids in taken for p in policies]
        if self.stop_token_ids:
            settings = replace(settings, stop_token_ids=tuple(dict.fromkeys(
                (*settings.stop_token_ids, *self.stop_token_ids))))
        ref = host.sample.remote([r[1] for r in rows], [r[2] for r in rows], settings, seed,
                                 None if keep is None else (*keep, self.worker_index))
        texts = [self._text(self.texts[pid]) for pid, _, _ in rows]
        return RolloutPart(self.worker_index, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [ref],
                           texts, [self.columns[pid] for pid, _, _ in rows],
                           [self.texts[pid] if is_conversation(self.texts[pid]) else None for pid, _, _ in rows])

    def render(self, messages: list[dict]) -> str:
        """A conversation as the tokenizer's chat template renders it, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the prompts are conversations, but the tokenizer has no chat template: give it one "
                             "(tokenizer.chat_template) or use text prompts")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(self, prompts: list) -> tuple[list[list[int]], list, tuple[int, ...]]:
        """Held-out prompts (texts, conversations or token ids) for an evaluation: (token ids, the texts
        reward functions see, the stop tokens their completions end at besides EOS)."""
        stop = tuple(end_of_turn_ids(self.tokenizer)) if any(is_conversation(p) for p in prompts) else ()
        return self.encode(prompts), [self._text(p) for p in prompts], stop

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of `texts` as prompts (BOS added, truncated like the stream's prompts)."""
        out = []
        for t in texts:
            ids = self._encode(t)
            if ids is None:
                raise ValueError("empty prompt: every prompt needs at least one non-space character")
            out.append(ids)
        return out

    def decode(self, token_lists: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)

    def tensor_bytes(self) -> int:
        """Bytes held in torch tensors by this process (to show it holds no model weights)."""
        import gc

        import torch

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))
