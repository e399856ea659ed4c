"""Stage 2 (reward): held-out accuracy, the folder format (ours and TRL/peft's), base checks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from marl_ray.config import ConfigError
from marl_ray.stages.reward import RewardConfig, RewardLoraSpec, _texts_of, main_reward, run_reward

# A random-weight tiny Llama with a domain tokenizer reaches held-out accuracy ~0.75 with these
# (128 steps, ~6 s on 2 idle cores; seeds 0 and 1 gave 0.76 and 0.745): the score head over
# attention-pooled token embeddings learns the lexicon.
FAST = dict(n_pairs=1024, n_eval_pairs=200, epochs=2, batch_size=16, lr=3e-3, warmup_steps=0, save_every=0,
            lora=RewardLoraSpec(r=8, alpha=16), progress=False)


def fast(**kw) -> dict:
    return {**FAST, **kw}


@pytest.fixture(scope="module")
def domain_base(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer was trained on the domain corpus (random weights: no SFT needed)."""
    from marl_ray.data.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("domain_base"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def other_domain_base(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as domain_base, other weights."""
    from marl_ray.data.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("other_domain_base"), size="tiny", seed=1)


@pytest.fixture(scope="module")
def trained(domain_base, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rm") / "reward"
    return run_reward(RewardConfig(base=str(domain_base), out_dir=str(out), **fast()))


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise Interrupt(f"interrupted at step {state.global_step}")

    return _Stop()


def test_held_out_accuracy_is_well_above_chance(trained):
    assert trained["reward_accuracy"] >= 0.65, trained  # chance is 0.5 +- 0.035 on 200 pairs
    assert trained["reward_accuracy"] > trained["reward_accuracy_init"] + 0.1
    assert trained["oracle_corr"] > 0.3
    assert trained["n_eval_pairs"] == 200 and trained["final_train_loss"] < trained["first_train_loss"]


def test_folder_is_trl_format_with_our_metadata(trained, domain_base):
    from safetensors.torch import load_file

    from marl_ray.model.adapter_io import base_fingerprint, read_meta
    from marl_ray.model import load_base

    folder = Path(trained["adapter"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in (cfg["modules_to_save"] or [])
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert any(k.startswith("base_model.model.score.") for k in keys)
    meta = read_meta(folder)
    assert meta == {"role": "reward", "base_fingerprint": base_fingerprint(load_base(str(domain_base))),
                    "quantization": "none", "dtype": "float32", "num_labels": 1}
    assert not (folder.parent / "checkpoints").exists()


def test_multi_adapter_and_peft_give_the_same_scores(trained, domain_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from marl_ray.data.domain import preference_pairs
    from marl_ray.model import MultiAdapterModel

    texts = [t for p in preference_pairs(4, seed=5, split="eval") for t in (p["chosen"], p["rejected"])]
    tok = AutoTokenizer.from_pretrained(str(domain_base))

    seq = AutoModelForSequenceClassification.from_pretrained(str(domain_base), num_labels=1)
    seq.config.pad_token_id = tok.pad_token_id
    peft_model = PeftModel.from_pretrained(seq, trained["adapter"]).eval()
    tok.padding_side = "right"
    right = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = peft_model(**right).logits[:, 0]

    model = MultiAdapterModel.from_pretrained(str(domain_base))  # on the GPU where there is one
    model.add_reward("rm", trained["adapter"])
    dev = model.device
    got = model.reward_scores("rm", right["input_ids"].to(dev), right["attention_mask"].to(dev)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tok.padding_side = "left"
    left = tok(texts, return_tensors="pt", padding=True)
    got = model.reward_scores("rm", left["input_ids"].to(dev), left["attention_mask"].to(dev)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert want.std() > 0.1  # a trained head, not a constant


def test_adapter_from_another_base_is_refused(trained, other_domain_base):
    from marl_ray.model.adapter_io import AdapterError
    from marl_ray.model import MultiAdapterModel

    model = MultiAdapterModel.from_pretrained(str(other_domain_base))
    with pytest.raises(AdapterError, match="different base"):
        model.add_reward("rm", trained["adapter"])
    assert model.rewards == []


def test_interrupted_reward_resumes(domain_base, tmp_path):
    out = tmp_path / "reward"
    cfg = RewardConfig(base=str(domain_base), out_dir=str(out), **fast(n_pairs=64, epochs=1, save_every=2))
    with pytest.raises(Interrupt):
        run_reward(cfg, callbacks=[interrupt_at(3)])
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    (out / ".adapter.tmp-killed").mkdir()
    s = run_reward(cfg)
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "log.txt", "reward_summary.json",
                                                     "train_log.jsonl"]


def test_jsonl_pairs_with_prompts_and_a_held_out_file(domain_base, tmp_path):
    from marl_ray.data.domain import preference_pairs, write_jsonl

    # TRL's explicit-prompt format: the prompt is not repeated in chosen/rejected
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"][len(p["prompt"]):], "rejected": p["rejected"][len(p["prompt"]):]}
            for p in preference_pairs(48, seed=2)]
    train = write_jsonl(rows, tmp_path / "pairs.jsonl")
    held = write_jsonl(preference_pairs(16, seed=2, split="eval"), tmp_path / "held.jsonl")
    s = run_reward(RewardConfig(base=str(domain_base), out_dir=str(tmp_path / "rm"), pairs=str(train),
                                eval_pairs=str(held), **fast(epochs=1)))
    assert s["n_train_pairs"] == 48 and s["n_eval_pairs"] == 16 and s["oracle_corr"] is None


def test_texts_of_follows_trl_prompt_convention():
    assert _texts_of({"chosen": "a good film.", "rejected": "a bad film."}) == ("a good film.", "a bad film.")
    assert _texts_of({"prompt": "the film", "chosen": " was good.", "rejected": " was bad."}) == \
        ("the film was good.", "the film was bad.")
    assert _texts_of({"prompt": "the film", "chosen": "the film was good.", "rejected": " was bad."}) == \
        ("the film was good.", "the film was bad.")


def test_bad_jsonl_names_the_line(domain_base, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"chosen": "good.", "rejected": "bad."}\n\n{"chosen": "fine.", "rejected": \n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl: line 3"):
        run_reward(RewardConfig(base=str(domain_base), out_dir=str(tmp_path / "rm"), pairs=str(pairs)))
    pairs.write_text('{"chosen": "good.", "rejected": "bad."}\n{"chosen": "fine."}\n')
    with pytest.raises(ValueError, match=r"line 2: missing required key\(s\) 'rejected'"):
        run_reward(RewardConfig(base=str(domain_base), out_dir=str(tmp_path / "rm"), pairs=str(pairs)))
    assert not (tmp_path / "rm").exists()


def test_base_errors_and_cli_help(tmp_path, capsys):
    (tmp_path / "sft" / "base").mkdir(parents=True)
    (tmp_path / "sft" / "base" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is an SFT output folder; use"):
        run_reward(RewardConfig(base=str(tmp_path / "sft"), out_dir=str(tmp_path / "rm")))
    with pytest.raises(ConfigError, match="does not exist"):
        run_reward(RewardConfig(base=str(tmp_path / "nope"), out_dir=str(tmp_path / "rm")))
    with pytest.raises(SystemExit) as e:
        main_reward(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("base", "out_dir", "pairs", "eval_pairs", "lora.r", "lora.target_modules", "quantization"):
        assert f"  {name} (" in text, name


def test_training_on_a_4bit_base(domain_base, tmp_path):
    from safetensors.torch import load_file

    from marl_ray.model.adapter_io import read_meta
    from marl_ray.model import MultiAdapterModel, quantization_config

    try:
        quantization_config("4bit", torch.float32)
    except ValueError as e:
        pytest.skip(str(e))
    s = run_reward(RewardConfig(base=str(domain_base), out_dir=str(tmp_path / "rm"), quantization="4bit",
                                **fast(n_pairs=32, n_eval_pairs=16, epochs=1)))
    assert read_meta(s["adapter"])["quantization"] == "4bit"
    weights = load_file(str(Path(s["adapter"]) / "adapter_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}  # adapters stay fp32 on a quantized base
    model = MultiAdapterModel.from_pretrained(str(domain_base), quantization="4bit")
    model.add_reward("rm", s["adapter"])
    ids = torch.tensor([[1, 40, 41, 42, 43]], device=model.device)
    assert torch.isfinite(model.reward_scores("rm", ids, torch.ones_like(ids))).all()


def _conversational_pairs(n: int) -> list[dict]:
    good = ["a great film", "great fun", "a fun plot"]
    bad = ["a dull film", "dull music", "the plot was dull"]
    return [{"prompt": [{"role": "user", "content": "how was the film?"}],
             "chosen": [{"role": "assistant", "content": good[i % 3]}],
             "rejected": [{"role": "assistant", "content": bad[i % 3]}]} for i in range(n)]


def test_conversational_pairs_render_with_the_chat_template(tmp_path):
    """TRL's conversational preference format: prompt + chosen / rejected rendered whole with the base's chat
    template, tokenized without a second BOS; the adapter learns them. No chat template: refused first."""
    from marl_ray.data.tiny import build_tiny
    from marl_ray.stages.reward import _render

    base = build_tiny(tmp_path / "chat_base", size="tiny", seed=0, chat=True)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _conversational_pairs(96)))
    s = run_reward(RewardConfig(base=str(base), out_dir=str(tmp_path / "rm"), pairs=str(pairs),
                                **fast(epochs=2, n_pairs=96)))
    assert s["reward_accuracy"] > 0.9, s
    from transformers import AutoTokenizer

    (chosen, _), = _render(AutoTokenizer.from_pretrained(base), _conversational_pairs(1), "pairs")[0]
    assert chosen.startswith("<|im_start|>user\nhow was the film?<|im_end|>") and chosen.endswith("<|im_end|>\n")

    plain = build_tiny(tmp_path / "plain_base", size="tiny", seed=0)
    with pytest.raises(ConfigError, match="pairs: the pairs are conversations, but the base's tokenizer has no chat"):
        run_reward(RewardConfig(base=str(plain), out_dir=str(tmp_path / "rm2"), pairs=str(pairs), **fast()))
    assert not (tmp_path / "rm2").exists()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({**_conversational_pairs(1)[0], "rejected": "dull"}) + "\n")
    with pytest.raises(ConfigError, match=r"row 1: \['chosen', 'prompt'\] are conversations but \['rejected'\]"):
        run_reward(RewardConfig(base=str(base), out_dir=str(tmp_path / "rm3"), pairs=str(mixed), **fast()))
