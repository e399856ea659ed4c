"""Stage 1, SFT (`marl-ray sft`): a base model that speaks the target domain.

* ``base: scratch`` (the embedded default): train a byte-level BPE tokenizer on the corpus and a
  small Llama from random weights (no pretrained weights exist here); full training.
* ``base: <path or hub id>``: fine-tune any causal LM, fully (``mode: full`` -> ``out_dir/base``)
  or with a LoRA adapter (``mode: lora``, optionally on a 4/8-bit base -> ``out_dir/adapter``, a
  peft folder to use as stage 3's ``model.reference_adapter``, and as ``policies[i].init_from``).

Training is TRL's SFTTrainer. It fits: it brings what a hand-written loop would have to redo (EOS
handling, packing, LoRA/QLoRA wiring, checkpoints that resume exactly: optimizer, scheduler, RNG and
data position; the same code path for hub models on GPUs), and it costs little. Measured on 2 idle
CPU cores with the demo model (batch 32): 87 ms/step against 66-72 ms/step for a bare torch loop, a
fixed per-step overhead (collation, per-step token metrics) that vanishes next to a real model's
step. Two of its defaults are GPU-minded and overridden here: activation checkpointing and bf16 are
off unless asked for (on 2 CPU cores bf16 made the demo slower: 53 s against 44 s for 400 steps).
Interrupted runs are handled in `common.prepare_out_dir`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

from marl_ray.config import ConfigError, LoraSpec, add_config_args, config_from_args, opt, spec, validate
from marl_ray import console
from marl_ray.stages import common

log = logging.getLogger(__name__)

#: Model shapes for base=scratch: the SIZES of marl_ray.data.tiny plus "demo", the default (0.72M
#: parameters): with the default 600 steps it learns the embedded domain (held-out ppl 2.79) in
#: about a minute on 2 idle CPU cores.
SCRATCH_SIZES = {"demo": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4),
                 "tiny": {}, "small": {}, "medium": {}, "large": {}}
DEFAULT_LR = {"scratch": 3e-3, "lora": 1e-3, "full": 5e-5}


@spec
class SFTConfig:
    out_dir: str = opt("runs/sft", "Output folder: base/ (mode full) or adapter/ (mode lora), sft_summary.json, "
                                   "checkpoints/ while unfinished.")
    base: str = opt("scratch", "scratch = build a tokenizer and a small Llama from random weights on the data; "
                               "otherwise the path or hub id of a causal LM to fine-tune.")
    size: Literal["demo", "tiny", "small", "medium", "large"] = opt(
        "demo", "Model shape for base=scratch: demo (H=128, 3 layers), or tiny/small/medium/large of the benchmark.")
    hidden_size: Optional[int] = opt(None, "base=scratch: override the hidden size of `size`.", ge=8)
    num_layers: Optional[int] = opt(None, "base=scratch: override the number of layers of `size`.", ge=1)
    vocab_size: int = opt(512, "base=scratch: size of the BPE vocabulary trained on the data.", ge=16)
    data: str = opt("embedded", "embedded = the generated movie-review corpus; else a JSONL file or a `datasets` "
                                "name or folder whose rows hold a text (text_field), a conversation ('messages': "
                                "a list of {role, content}, rendered with the chat template), or 'prompt' + "
                                "'completion' (texts or conversations; loss on the completion only), as TRL's "
                                "SFTTrainer takes them.")
    data_split: str = opt("train", "Split to read when `data` is a `datasets` name.")
    text_field: str = opt("text", "Field (column) holding the text in a JSONL file or data set.")
    corpus_size: int = opt(20000, "data=embedded: number of reviews generated.", ge=2)
    eval_fraction: float = opt(0.025, "Fraction of the texts held out for the eval loss.", gt=0, lt=1)
    mode: Literal["full", "lora"] = opt("full", "full = train every weight (writes base/); lora = train a LoRA "
                                                "adapter on the frozen base (writes adapter/, the PPO reference).")
    lora: LoraSpec = opt(LoraSpec, "LoRA shape for mode=lora.")
    quantization: Literal["none", "8bit", "4bit"] = opt("none", "mode=lora: load the frozen base quantised (QLoRA).")
    steps: Optional[int] = opt(600, "Optimizer steps; null = `epochs` passes over the data.", ge=1)
    epochs: float = opt(1.0, "Passes over the data when steps is null.", gt=0)
    batch_size: int = opt(32, "Texts per optimizer step.", ge=1)
    lr: Optional[float] = opt(None, "Peak learning rate (cosine decay); null = 3e-3 from scratch, 1e-3 for lora, "
                                    "5e-5 for a full fine-tune of a pretrained base.", gt=0)
    warmup_steps: int = opt(20, "Linear warm-up steps.", ge=0)
    max_len: int = opt(64, "Texts are truncated to this many tokens.", ge=4)
    packing: bool = opt(False, "Pack several texts into each max_len row (faster on many short texts).")
    bf16: bool = opt(False, "bf16 mixed precision (worth it on GPUs and AMX CPUs with large models).")
    seed: int = opt(0, "Seed of the model init, data order and samples.", ge=0)
    save_every: int = opt(100, "Save a resumable checkpoint every N steps; 0 = none (a rerun starts over).", ge=0)
    keep_last: int = opt(1, "Number of checkpoints kept.", ge=1)
    resume: bool = opt(True, "Resume an interrupted run in out_dir (or return at once if it finished); "
                             "false = discard out_dir's checkpoints and train anew.")
    samples: int = opt(64, "Continuations sampled from held-out openings after training (0 = none).", ge=0)
    progress: bool = opt(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        validate(self)

    def _check(self, at: str) -> None:
        scratch = self.base == "scratch"
        if scratch and self.mode == "lora":
            raise ConfigError("mode: lora needs a trained base (a path or hub id); a base built from scratch has "
                              "random weights, so use mode=full")
        if self.quantization != "none" and self.mode != "lora":
            raise ConfigError(f"quantization: {self.quantization} needs mode=lora (quantised weights cannot be "
                              "fully trained)")
        if not scratch and (self.hidden_size or self.num_layers):
            raise ConfigError("hidden_size/num_layers: only for base=scratch; a given base keeps its shape")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR["scratch" if self.base == "scratch" else self.mode]


def _is_conversation(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) for m in v)


def _example(r: dict, where: str, text_field: str):
    """A row as TRL's SFTTrainer takes it: a text (its `text_field`), {"messages": conversation}, or
    {"prompt", "completion"} (texts or conversations; the loss is then on the completion only, as TRL's)."""
    from marl_ray.data.prompts import PromptDataError, check_conversation

    try:
        if text_field in r:
            t = r[text_field]
            if not isinstance(t, str):
                raise ConfigError(f"{where}: {text_field!r} is a {type(t).__name__}, expected a string")
            return t if t.strip() else None
        if "messages" in r:
            check_conversation(r["messages"], where)
            return {"messages": r["messages"]}
        if "prompt" in r and "completion" in r:
            p, c = r["prompt"], r["completion"]
            if isinstance(p, str) and isinstance(c, str):
                return {"prompt": p, "completion": c}
            if _is_conversation(p) and _is_conversation(c):
                check_conversation(p, f"{where}: 'prompt'")
                check_conversation(c, f"{where}: 'completion'")
                return {"prompt": p, "completion": c}
            raise ConfigError(f"{where}: 'prompt' and 'completion' must be both texts or both conversations")
    except PromptDataError as e:
        raise ConfigError(str(e)) from None
    raise ConfigError(f"{where} has no {text_field!r} field, nor 'messages', nor 'prompt' + 'completion'; its fields "
                      f"are {sorted(r)}: set text_field to the one that holds the text")


def _texts(cfg: SFTConfig) -> tuple[list, list]:
    """(train examples, held-out examples): texts, or conversational / prompt-completion rows (`_example`)."""
    if cfg.data == "embedded":
        from marl_ray.data.domain import corpus

        texts = corpus(cfg.corpus_size, seed=cfg.seed)
    else:
        rows = common.load_rows(cfg.data, [], "data", cfg.data_split)
        texts = [e for i, r in enumerate(rows)
                 if (e := _example(r, f"data: {cfg.data}: row {i + 1}", cfg.text_field)) is not None]
        kinds = {type(e).__name__ if isinstance(e, str) else ",".join(sorted(e)) for e in texts}
        if len(kinds) > 1:
            raise ConfigError(f"data: {cfg.data} mixes row forms ({sorted(kinds)}): give one form per data set")
        if not texts:
            raise ConfigError(f"data: {cfg.data} has no non-empty rows")
    return common.split_rows(texts, cfg.eval_fraction, cfg.seed, "data")


def _chat(examples: list) -> bool:
    """Whether the examples are conversations (they need a chat template)."""
    e = examples[0]
    return isinstance(e, dict) and ("messages" in e or _is_conversation(e.get("prompt")))


def _plain_texts(examples: list) -> list[str]:
    """The words of the examples (a scratch tokenizer is trained on them)."""
    out = []
    for e in examples:
        if isinstance(e, str):
            out.append(e)
            continue
        for v in e.values():
            out += [m["content"] for m in v] if isinstance(v, list) else [v]
    return out


def _dataset(examples: list):
    from datasets import Dataset

    if isinstance(examples[0], str):
        return Dataset.from_dict({"text": examples})
    return Dataset.from_list(examples)


def _scratch_model(cfg: SFTConfig, train: list):
    from marl_ray.data.tiny import build_llama, build_tokenizer

    # conversations: a ChatML template and its turn tokens, as Qwen2's
    tokenizer = build_tokenizer(_plain_texts(train), vocab_size=cfg.vocab_size, chat=_chat(train))
    tokenizer.model_max_length = max(tokenizer.model_max_length, cfg.max_len)
    dims = dict(SCRATCH_SIZES[cfg.size])
    if cfg.hidden_size:
        dims["hidden_size"] = cfg.hidden_size
    if cfg.num_layers:
        dims["num_hidden_layers"] = cfg.num_layers
    base_size = "tiny" if cfg.size == "demo" else cfg.size
    model = build_llama(base_size, seed=cfg.seed, vocab_size=len(tokenizer),
                        max_position_embeddings=max(256, cfg.max_len), **dims)
    return model.train(), tokenizer


def _base_path(cfg: SFTConfig) -> str:
    """cfg.base as a path or hub id to load: a .gguf file is dequantized once into a model folder."""
    from marl_ray.model.gguf import GGUFError, resolve_base

    try:
        return resolve_base(cfg.base)
    except GGUFError as e:
        raise ConfigError(f"base: {e}") from None


def _pretrained_model(cfg: SFTConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from marl_ray.model.loading import keep_4bit_layout, quantization_config

    common.check_local_base(cfg.base, "base")
    kwargs = {"dtype": torch.float32}
    qcfg = quantization_config(cfg.quantization, torch.bfloat16 if cfg.bf16 else torch.float32)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    with common.quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(_base_path(cfg), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(_base_path(cfg))
        except OSError as e:
            raise ConfigError(f"base: cannot load {cfg.base!r} as a causal LM: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep_4bit_layout(model)
    return model, tokenizer


def _sample(model, tokenizer, cfg: SFTConfig, held_out: list[str]) -> list[dict]:
    """Sampled continuations of held-out openings (4 words), with the oracle's score on embedded data."""
    import torch

    from marl_ray.data import domain

    chat = _chat(held_out)
    if cfg.data == "embedded":
        openings = domain.prompts(cfg.samples, seed=cfg.seed, split="eval")
    else:
        openings = [_opening(tokenizer, e) for e in held_out[:cfg.samples]]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:  # a rendered conversation has its special tokens already
        enc = tokenizer(openings, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        out = model.generate(**enc, do_sample=True, max_new_tokens=cfg.max_len, temperature=1.0, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    rows = [{"prompt": p, "text": t.strip()} for p, t in zip(openings, texts)]
    if cfg.data == "embedded":
        for r in rows:
            r["oracle"] = domain.oracle_score(r["text"])
    return rows


def _opening(tokenizer, e) -> str:
    """What a sample continues: a text's first 4 words, a prompt-completion row's prompt, a conversation up
    to its last assistant message, rendered for the assistant's turn."""
    if isinstance(e, str):
        return " ".join(e.split()[:4])
    if "messages" in e:
        msgs = e["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return tokenizer.apply_chat_template(msgs[:last] or msgs[:1], add_generation_prompt=True, tokenize=False)
    p = e["prompt"]
    return p if isinstance(p, str) else tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)


def _sample_stats(samples: list[dict]) -> dict:
    scores = [s["oracle"] for s in samples if "oracle" in s]
    if not scores:
        return {}
    n = len(scores)
    mean = sum(scores) / n
    return {"sample_oracle_mean": mean,
            "sample_oracle_std": math.sqrt(sum((s - mean) ** 2 for s in scores) / n),
            "sample_frac_positive": sum(s > 0 for s in scores) / n,
            "sample_frac_negative": sum(s < 0 for s in scores) / n}


def run_sft(cfg: SFTConfig, callbacks: Sequence = ()) -> dict:
    """Train stage 1 into cfg.out_dir; returns the summary (paths, losses, samples).

    `callbacks` are extra transformers TrainerCallbacks (progress hooks; tests interrupt with one).
    """
    with common.quiet_progress(), console.log_file(Path(cfg.out_dir).expanduser()):
        return _run_sft(cfg, callbacks)


def _run_sft(cfg: SFTConfig, callbacks: Sequence) -> dict:
    import json

    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from marl_ray.model.adapter_io import META_FILE, atomic_dir, base_fingerprint

    t0 = time.perf_counter()
    result = "adapter" if cfg.mode == "lora" else "base"
    if cfg.base != "scratch":
        common.check_local_base(cfg.base, "base")
        _base_path(cfg)  # a .gguf base: refused (named) or converted here, before anything is written
        if cfg.mode == "lora":  # a target name that matches nothing: refused before anything is written
            common.check_targets(cfg.base, cfg.lora.target_modules, "lora.target_modules")
    train_texts, eval_texts = _texts(cfg)  # data errors (a bad JSONL line) before any model work
    if cfg.base != "scratch" and _chat(train_texts):  # a template to render them with, before any model work
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(_base_path(cfg)), "chat_template", None):
            raise ConfigError(f"data: {cfg.data} holds conversations, but the tokenizer of {cfg.base} has no chat "
                              "template: give it one (tokenizer_config.json chat_template) or give texts")
    ckpt_dir, resume_from, done = common.prepare_out_dir(cfg, "sft", result)
    if done is not None:
        log.info("sft already finished in %s (same config): nothing to do; --set resume=false retrains", cfg.out_dir)
        return done
    if cfg.base == "scratch":
        model, tokenizer = _scratch_model(cfg, train_texts)
    else:
        model, tokenizer = _pretrained_model(cfg)
    fingerprint = base_fingerprint(model)  # of the frozen base, for mode=lora's marl_ray.json
    peft_config = common.lora_config(cfg.lora, "CAUSAL_LM", model) if cfg.mode == "lora" else None
    args = common.trainer_args(
        TRLSFTConfig, cfg, ckpt_dir, cfg.steps, cfg.epochs, learning_rate=cfg.learning_rate,
        max_length=cfg.max_len, packing=cfg.packing, dataset_text_field="text", eval_packing=False)
    with common.quiet_transformers():
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                             train_dataset=_dataset(train_texts), eval_dataset=_dataset(eval_texts),
                             callbacks=list(callbacks))
    console.route_trainer_logs(trainer, console.progress(cfg.progress))
    common.keep_adapters_fp32(trainer.model)
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    eval_loss = trainer.evaluate()["eval_loss"]
    model = trainer.model
    samples = _sample(model, tokenizer, cfg, eval_texts) if cfg.samples else []

    target = Path(cfg.out_dir).expanduser() / result
    with atomic_dir(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        if cfg.mode == "lora":
            model.save_pretrained(str(tmp))
            meta = {"role": "reference", "base_fingerprint": fingerprint, "quantization": cfg.quantization,
                    "dtype": "float32"}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        else:
            model.save_pretrained(str(tmp))
            tokenizer.padding_side = "left"  # what generation (PPO rollouts) wants
            tokenizer.save_pretrained(str(tmp))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "stage": "sft", "mode": cfg.mode, result: str(target), "steps": out.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "first_train_loss": losses[0] if losses else None, "final_train_loss": losses[-1] if losses else None,
        "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
        "n_train": len(train_texts), "n_eval": len(eval_texts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - t0, **_sample_stats(samples), "samples": samples,
    }
    return common.finish_out_dir(cfg, "sft", summary, trainer.state.log_history)


def main_sft(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="marl-ray sft",
        description="Stage 1: supervised fine-tuning. With base=scratch (default) builds a tokenizer and a small "
                    "Llama on the embedded movie-review corpus and writes OUT_DIR/base; with a model path or hub "
                    "id fine-tunes it fully (OUT_DIR/base) or as a LoRA reference adapter (OUT_DIR/adapter). "
                    "An interrupted run resumes when rerun with the same config.")
    add_config_args(parser, SFTConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, SFTConfig)
    s = run_sft(cfg)
    where = s.get("base") or s.get("adapter")
    print(f"sft done: {s['steps']} steps, held-out loss {s['eval_loss']:.3f} (ppl {s['eval_ppl']:.2f}) -> {where}")
    if "sample_oracle_mean" in s:
        print(f"samples: oracle mean {s['sample_oracle_mean']:+.2f}, std {s['sample_oracle_std']:.2f}, "
              f"{s['sample_frac_positive']:.0%} positive, {s['sample_frac_negative']:.0%} negative")
    for row in s["samples"][:5]:
        print(f"  {row.get('oracle', float('nan')):+.2f}  {row['text']}")
    return 0
