"""Bases for the episode tests: a ChatML tokenizer whose template renders tools, and a tiny Llama that
was taught (a few hundred full-weight steps on two conversations) to call the calculator's tool and then
read its result, so that a real sampler produces a real tool call."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import reliability_utils as ru

# ChatML, with tools: their names in a system turn, a call as <tool_call>{json}</tool_call>
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QUESTION = "What is 2 plus 3?"
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
ANSWER = "It is 5."


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_base(root: Path, tools: bool = True, taught: bool = False) -> str:
    from marl_ray.data.tiny import build_llama, build_tokenizer

    tok = build_tokenizer(ru.TEXTS + [QUESTION, CALL, ANSWER] * 20, vocab_size=300, chat=True)
    if tools:
        tok.chat_template = TOOL_TEMPLATE
    model = build_llama("tiny", seed=0, vocab_size=len(tok))
    if taught:
        _teach(model, tok)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def _teach(model, tok, steps: int = 300):
    """Full-weight steps on [prompt | completion] pairs, loss on the completion: the tool call, then the answer."""
    schema = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    first = [{"role": "user", "content": QUESTION}]
    second = [first[0], {"role": "assistant", "content": "",
                         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
              {"role": "tool", "name": "add", "content": "5"}]
    pairs = []
    for msgs, target in ((first, CALL + "<|im_end|>"), (second, ANSWER + "<|im_end|>")):
        p = tok(tok.apply_chat_template(msgs, tools=schema, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"]
        pairs.append((p, t))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for p, t in pairs:
            ids = torch.tensor([p + t])
            labels = torch.tensor([[-100] * len(p) + t])
            loss = loss + model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
