"""Stage 1 (SFT): scratch base, LoRA reference adapter, interruption and rerun, data errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from marl_ray.config import ConfigError
from marl_ray.stages.sft import SFTConfig, main_sft, run_sft

# A few steps of the tiny model on a small embedded corpus: seconds on 2 cores.
FAST = dict(size="tiny", corpus_size=400, steps=12, batch_size=16, max_len=48, warmup_steps=2, save_every=0,
            samples=4, progress=False)


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    """A TrainerCallback that raises once training reaches `step` (as a kill would stop it)."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise Interrupt(f"interrupted at step {state.global_step}")

    return _Stop()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "checkpoints")


def test_scratch_sft_writes_a_loadable_base_and_learns(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    s = run_sft(SFTConfig(out_dir=str(out), **FAST))
    assert s["steps"] == 12 and s["resumed_from"] is None
    assert s["final_train_loss"] < s["first_train_loss"] - 0.5, s  # from ~ln(512) = 6.2
    assert s["eval_loss"] < s["first_train_loss"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    tok = AutoTokenizer.from_pretrained(str(out / "base"))
    assert model.config.vocab_size == len(tok) and tok.pad_token_id == model.config.pad_token_id == 0
    assert tok.padding_side == "left"
    assert len(s["samples"]) == 4 and all("oracle" in r for r in s["samples"])
    enc = tok(["the movie with tom"], return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=5, do_sample=False).shape[1] > enc["input_ids"].shape[1]
    assert json.loads((out / "sft_summary.json").read_text())["eval_loss"] == s["eval_loss"]
    assert leftovers(out) == []  # no checkpoints or temp folders once finished


def test_lora_sft_adapter_is_a_reference_adapter(base_dir, tmp_path):
    from marl_ray.model.adapter_io import read_meta
    from marl_ray.model import MultiAdapterModel

    out = tmp_path / "lora"
    s = run_sft(SFTConfig(out_dir=str(out), base=str(base_dir), mode="lora", corpus_size=200, steps=4,
                          batch_size=8, max_len=48, warmup_steps=0, save_every=0, samples=0, progress=False))
    folder = Path(s["adapter"])
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    model = MultiAdapterModel.from_pretrained(str(base_dir))
    assert read_meta(folder)["role"] == "reference"
    assert read_meta(folder)["base_fingerprint"] == model.fingerprint
    model.set_reference_adapter(folder)
    assert model.roles["ref"] == "reference"
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]], device=model.device)
    mask = torch.ones_like(ids)
    ref = model.reference_logprobs(ids, mask, response_start=3)
    with model.peft.disable_adapter():
        bare = model.reference_logprobs(ids, mask, response_start=3)
    assert not torch.allclose(ref, bare)  # the trained adapter moved the reference off the bare base
    model.load_policy("p0", folder)  # it also seeds a policy (policies[i].init_from), with a fresh value head
    assert model.policies == ["p0"]


def test_interrupted_sft_resumes_and_reruns_cleanly(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    cfg = SFTConfig(out_dir=str(out), **{**FAST, "save_every": 3})
    with pytest.raises(Interrupt):
        run_sft(cfg, callbacks=[interrupt_at(7)])
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-6"] and not (out / "base").exists()
    # what a kill can leave: a half-saved checkpoint and a half-written result folder
    (out / "checkpoints" / "checkpoint-9").mkdir()
    (out / "checkpoints" / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (out / ".base.tmp-killed").mkdir()

    with pytest.raises(ConfigError, match="lr"):  # another config does not resume someone else's run
        run_sft(SFTConfig(out_dir=str(out), **{**FAST, "save_every": 3, "lr": 1e-4}))

    s = run_sft(cfg)
    assert s["resumed_from"].endswith("checkpoint-6") and s["steps"] == 12
    assert leftovers(out) == []
    resumed = AutoModelForCausalLM.from_pretrained(str(out / "base")).state_dict()

    # same weights as an uninterrupted run: the resume restored optimizer, schedule and data position
    whole = run_sft(SFTConfig(out_dir=str(tmp_path / "whole"), **{**FAST, "save_every": 3}))
    straight = AutoModelForCausalLM.from_pretrained(whole["base"]).state_dict()
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-4, rtol=1e-3)

    again = run_sft(cfg)  # finished with this config: returns the summary, trains nothing
    assert again == s
    assert run_sft(SFTConfig(out_dir=str(out), **{**FAST, "resume": False, "steps": 2}))["steps"] == 2


def test_sft_on_a_jsonl_file(tmp_path):
    from marl_ray.data.domain import corpus, write_jsonl

    data = write_jsonl([{"body": t} for t in corpus(60, seed=3)], tmp_path / "texts.jsonl")
    s = run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), data=str(data), text_field="body",
                          **{**FAST, "steps": 3, "samples": 2}))
    assert s["n_train"] + s["n_eval"] == 60 and s["steps"] == 3
    assert all("oracle" not in r for r in s["samples"])  # no gold scorer off the embedded domain


def test_bad_jsonl_names_the_line(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "a fine movie."}\n{"text": "a dull one."}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"texts\.jsonl: line 3"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), data=str(data), **FAST))
    data.write_text('{"text": "a fine movie."}\n{"txt": "a dull one."}\n')
    with pytest.raises(ValueError, match=r"texts\.jsonl: row 2 has no 'text' field.* its fields are \['txt'\]"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), data=str(data), **FAST))
    assert not (tmp_path / "sft").exists()  # refused before anything was written


def test_config_rules_and_cli_help(capsys):
    with pytest.raises(ConfigError, match="mode: lora needs a trained base"):
        SFTConfig(mode="lora")
    with pytest.raises(ConfigError, match="quantization: 4bit needs mode=lora"):
        SFTConfig(base="some/model", quantization="4bit")
    with pytest.raises(ConfigError, match="hidden_size"):
        SFTConfig(base="some/model", hidden_size=64)
    with pytest.raises(SystemExit) as e:
        main_sft(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("out_dir", "base", "size", "mode", "lora.r", "quantization", "steps", "save_every", "resume"):
        assert f"  {name} (" in text, name


def _chat_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = "the film was great and the plot was fun but the music was dull".split()
    return [{"messages": [{"role": "system", "content": "You review films."},
                          {"role": "user", "content": " ".join(rng.choice(words) for _ in range(4))},
                          {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(5))}]}
            for _ in range(n)]


CHAT_FAST = dict(size="tiny", steps=8, batch_size=16, max_len=64, warmup_steps=1, save_every=0, samples=2,
                 progress=False)


@pytest.mark.parametrize("form", ["messages", "prompt_completion"])
def test_conversational_sft_renders_with_the_chat_template(tmp_path, form):
    """TRL's conversational forms: {"messages"} and {"prompt", "completion"} lists of messages. From scratch
    the tokenizer gets ChatML turn tokens and template; samples continue a rendered conversation."""
    from transformers import AutoTokenizer

    rows = _chat_rows(160)
    if form == "prompt_completion":
        rows = [{"prompt": r["messages"][:2], "completion": r["messages"][2:]} for r in rows]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), data=str(data), **CHAT_FAST))
    assert s["eval_loss"] < s["first_train_loss"] - 0.5, s  # learned from ~ln(vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft" / "base")
    assert tok.chat_template and "<|im_end|>" in tok.all_special_tokens
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in s["samples"])


def test_conversational_data_errors_are_named(tmp_path, base_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match="row 1: message 0 has the unknown role 'robot'"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "a"), data=str(data), **CHAT_FAST))
    data.write_text(json.dumps({"body": "text"}) + "\n")
    with pytest.raises(ConfigError, match=r"row 1 has no 'text' field, nor 'messages', .* its fields are \['body'\]"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "a"), data=str(data), **CHAT_FAST))
    data.write_text(json.dumps({"text": "a review"}) + "\n" + json.dumps(_chat_rows(1)[0]) + "\n")
    with pytest.raises(ConfigError, match="mixes row forms"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "a"), data=str(data), **CHAT_FAST))
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8)))
    with pytest.raises(ConfigError, match="holds conversations, but the tokenizer of .* has no chat template"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "a"), data=str(data), base=str(base_dir), mode="lora",
                          **CHAT_FAST))
    assert not (tmp_path / "a").exists()
