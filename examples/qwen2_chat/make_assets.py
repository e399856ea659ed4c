"""Build what examples/qwen2_chat/config.yaml runs on, under FOLDER (default runs/qwen2-chat):

    FOLDER/base/           a tiny random Qwen2-shaped model (q/k/v biases) whose tokenizer has a ChatML
                           chat template, built locally and seeded: a stand-in for a Qwen2.5-Instruct folder
    FOLDER/prompts.jsonl   a conversational data set: {"messages": [...], "letter": "s"} rows

Usage: python examples/qwen2_chat/make_assets.py [FOLDER]
"""

import json
import random
import sys
from pathlib import Path

from marl_ray.data.domain import corpus
from marl_ray.data.tiny import build_tiny

LETTERS = "abcdefghilmnoprstw"


def main(folder: str = "runs/qwen2-chat") -> None:
    out = Path(folder)
    build_tiny(out / "base", texts=corpus(2000, seed=0), arch="qwen2", chat=True, seed=0)
    rng = random.Random(0)
    rows = []
    for i in range(400):
        letter = rng.choice(LETTERS)
        rows.append({"messages": [{"role": "system", "content": "You answer with one word."},
                                  {"role": "user", "content": f"Say a word that starts with '{letter}'."}],
                     "letter": letter})
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out / 'base'} and {out / 'prompts.jsonl'} ({len(rows)} conversations)")


if __name__ == "__main__":
    main(*sys.argv[1:])
