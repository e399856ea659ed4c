"""data/prompts.py: prompt sources in every form (JSONL, JSON, CSV, Parquet, save_to_disk folders),
conversational rows, the fields that travel with a prompt, and errors that name what is wrong."""

from __future__ import annotations

import json

import pytest

ROWS = [{"prompt": "2+3=", "answer": "5", "level": 1}, {"prompt": "7+8=", "answer": "15", "level": 2}]


def _write(tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        p = tmp_path / "p.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        p = tmp_path / "p.json"
        p.write_text(json.dumps({"data": ROWS}))
    elif kind == "csv":
        p = tmp_path / "p.csv"
        ds.to_csv(str(p))
    elif kind == "parquet":
        p = tmp_path / "p.parquet"
        ds.to_parquet(str(p))
    else:
        p = tmp_path / "disk"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(p))
    return str(p)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_form_gives_the_prompts_and_their_fields(tmp_path, kind):
    from marl_ray.data.prompts import load_rows

    prompts, columns = load_rows(_write(tmp_path, kind))
    assert prompts == ["2+3=", "7+8="]
    assert [str(c["answer"]) for c in columns] == ["5", "15"] and [int(c["level"]) for c in columns] == [1, 2]
    assert all("prompt" not in c for c in columns)


def test_split_and_prompt_field(tmp_path):
    from marl_ray.data.prompts import PromptDataError, load_rows

    folder = _write(tmp_path, "disk")
    assert load_rows(folder, split="test")[0] == ["2+3="]
    with pytest.raises(PromptDataError, match=r"no split 'dev'; it has \['test', 'train'\]"):
        load_rows(folder, split="dev")
    prompts, columns = load_rows(_write(tmp_path, "jsonl"), prompt_field="answer")
    assert prompts == ["5", "15"] and columns[0]["prompt"] == "2+3="


def test_conversations_and_their_errors(tmp_path):
    from marl_ray.data.prompts import PromptDataError, load_rows

    p = tmp_path / "chat.jsonl"
    conv = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+3="}]
    p.write_text(json.dumps({"messages": conv, "answer": "5"}) + "\n")
    prompts, columns = load_rows(str(p))
    assert prompts == [conv] and columns == [{"answer": "5"}]
    p.write_text(json.dumps({"prompt": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(PromptDataError, match="row 1: message 0 has the unknown role 'narrator'"):
        load_rows(str(p))


def test_bad_sources_name_what_is_wrong(tmp_path):
    from marl_ray.data.prompts import PromptDataError, load_rows

    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "2+3=", "answer": "5"}) + "\n")
    with pytest.raises(PromptDataError, match=r"row 1 has no 'prompt' field .*\['answer', 'question'\].*prompt_field"):
        load_rows(str(p))
    assert load_rows(str(p), prompt_field="question")[0] == ["2+3="]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptDataError, match="no rows"):
        load_rows(str(empty))
    with pytest.raises(PromptDataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PromptDataError, match="unknown file type '.txt'"):
        (tmp_path / "p.txt").write_text("x")
        load_rows(str(tmp_path / "p.txt"))


def test_a_worker_renders_conversations_with_the_chat_template(base_dir, tmp_path):
    """The worker renders a conversation with the tokenizer's chat template (generation prompt added);
    reward functions see the rendered text. Without a chat template: a clear error."""
    import shutil

    from marl_ray.runtime.rollout import RolloutWorker

    tok_dir = tmp_path / "tok"
    shutil.copytree(base_dir, tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a great film"}], "answer": "yes"}) + "\n")
    w = RolloutWorker(str(tok_dir), str(p), 0, 1, max_prompt_tokens=64)
    ((pid, ids),) = w.take(1)
    text = w.render([{"role": "user", "content": "a great film"}])
    assert text == "<user>a great film\n<assistant>"
    assert ids == w.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert w._text(w.texts[pid]) == text and w.columns[pid] == {"answer": "yes"}
    plain = RolloutWorker(str(base_dir), str(p), 0, 1, max_prompt_tokens=64)
    with pytest.raises(ValueError, match="no chat template"):
        plain.take(1)


def test_token_ids_are_used_as_given_before_a_prompt_text(tmp_path):
    from marl_ray.data.prompts import load_rows

    p = tmp_path / "ids.jsonl"
    p.write_text(json.dumps({"input_ids": [5, 6, 7], "prompt": "the text they came from"}) + "\n")
    prompts, columns = load_rows(str(p))
    assert prompts == [[5, 6, 7]] and columns == [{"prompt": "the text they came from"}]
