"""Stage 2, reward (`marl-ray reward`): a LoRA reward adapter + score head on the SFT base.

Trains `AutoModelForSequenceClassification(num_labels=1)` on the frozen base with a peft
``task_type="SEQ_CLS"`` LoRA (the score head is saved through ``modules_to_save``) on preference
pairs with the Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected)``, and writes
``out_dir/adapter``: exactly the folder TRL's RewardTrainer saves, plus ``marl_ray.json``
(role, base fingerprint, quantization, dtype) so stage 3 refuses it on another base.

Training is TRL's RewardTrainer, fed pairs we tokenize ourselves: left to itself it appends EOS to
every text, so the score would be learned at an EOS token that PPO responses (fixed length, no
EOS) never end with. Pre-tokenized, the score is learned at each text's last real token, where
`MultiAdapterModel.reward_scores` (and HF's sequence classifier, via pad_token_id) read it.
Held-out pairwise accuracy is measured here on pairs never trained on (embedded data: the
domain's "eval" split, whose openings never occur in training).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

from marl_ray.config import ConfigError, LoraSpec, add_config_args, config_from_args, opt, spec, validate
from marl_ray import console
from marl_ray.stages import common

log = logging.getLogger(__name__)


@spec
class RewardLoraSpec(LoraSpec):
    target_modules: Optional[tuple[str, ...]] = opt(
        ("all-linear",), "Modules LoRA wraps: all-linear (every linear layer but the output head and the score "
        "head: on Llama q/k/v/o_proj and gate/up/down_proj; the fused qkv_proj and gate_up_proj on Phi-3; c_attn, "
        "c_proj, c_fc on GPT-2), or names (a name matches each module whose dotted path ends with it), or null = "
        "the attention's query and value projections of the base's architecture (see lora.target_modules of a "
        "policy). A name that matches nothing in the base is refused before training starts.", one_or_many=True)


@spec
class RewardConfig:
    base: str = opt(help="Path (e.g. runs/sft/base) or hub id of the causal LM the adapter is trained on; stage 3 "
                         "must use the same base.")
    out_dir: str = opt("runs/reward", "Output folder: adapter/ (the reward adapter), reward_summary.json, "
                                      "checkpoints/ while unfinished.")
    pairs: str = opt("embedded", "embedded = oracle-ranked pairs of the movie-review domain; else a JSONL file "
                                 "with chosen/rejected (and optionally prompt) fields, texts or conversations (lists "
                                 "of {role, content}, rendered with the base's chat template), or a `datasets` name.")
    pairs_split: str = opt("train", "Split to read when `pairs` is a `datasets` name.")
    eval_pairs: Optional[str] = opt(None, "JSONL file of held-out pairs; null = hold out eval_fraction of `pairs` "
                                          "(embedded: the domain's eval split).")
    n_pairs: int = opt(4000, "pairs=embedded: number of training pairs.", ge=1)
    n_eval_pairs: int = opt(500, "pairs=embedded: number of held-out pairs.", ge=1)
    eval_fraction: float = opt(0.1, "Fraction of a pairs file held out when eval_pairs is null.", gt=0, lt=1)
    lora: RewardLoraSpec = opt(RewardLoraSpec, "LoRA shape of the reward adapter.")
    quantization: Literal["none", "8bit", "4bit"] = opt("none", "Load the frozen base quantised while training.")
    steps: Optional[int] = opt(None, "Optimizer steps; null = `epochs` passes over the pairs.", ge=1)
    epochs: float = opt(2.0, "Passes over the pairs when steps is null.", gt=0)
    batch_size: int = opt(32, "Pairs per optimizer step.", ge=1)
    lr: float = opt(3e-3, "Peak learning rate (cosine decay) of the LoRA weights and score head.", gt=0)
    warmup_steps: int = opt(10, "Linear warm-up steps.", ge=0)
    max_len: int = opt(128, "Texts are truncated to this many tokens (keeping the start).", ge=2)
    bf16: bool = opt(False, "bf16 mixed precision (worth it on GPUs and AMX CPUs with large models).")
    seed: int = opt(0, "Seed of the adapter init, pair sampling and data order.", ge=0)
    save_every: int = opt(50, "Save a resumable checkpoint every N steps; 0 = none (a rerun starts over).", ge=0)
    keep_last: int = opt(1, "Number of checkpoints kept.", ge=1)
    resume: bool = opt(True, "Resume an interrupted run in out_dir (or return at once if it finished); "
                             "false = discard out_dir's checkpoints and train anew.")
    progress: bool = opt(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        validate(self)


def _texts_of(row: dict) -> tuple[str, str]:
    """(chosen, rejected) full texts. With a prompt, TRL's convention: prompt + completion, unless the
    completion already starts with the prompt (as the embedded pairs and their JSONL dumps do)."""
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if prompt:
        chosen = chosen if chosen.startswith(prompt) else prompt + chosen
        rejected = rejected if rejected.startswith(prompt) else prompt + rejected
    return chosen, rejected


def _is_conversation(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) for m in v)


def _check_rows(rows: list[dict], what: str) -> list:
    """Pairs as (chosen text, rejected text), or, for conversational rows (TRL's preference format: `chosen`
    and `rejected` lists of {role, content} messages, with or without a `prompt` list), the row's
    conversations {"prompt", "chosen", "rejected"}, rendered once the tokenizer is loaded (`_render`)."""
    from marl_ray.data.prompts import PromptDataError, check_conversation

    out = []
    for i, r in enumerate(rows):
        keys = ("chosen", "rejected") + (("prompt",) if r.get("prompt") is not None else ())
        conv = [k for k in keys if _is_conversation(r.get(k))]
        if conv:
            if len(conv) != len(keys):
                raise ConfigError(f"{what}: row {i + 1}: {conv} are conversations but "
                                  f"{[k for k in keys if k not in conv]} are not: give all as conversations or as "
                                  "texts")
            try:
                for k in keys:
                    check_conversation(r[k], f"{what}: row {i + 1}: {k!r}")
            except PromptDataError as e:
                raise ConfigError(str(e)) from None
            out.append({"prompt": list(r.get("prompt") or []), "chosen": r["chosen"], "rejected": r["rejected"]})
            continue
        for k in keys:
            if not isinstance(r.get(k), str):
                raise ConfigError(f"{what}: row {i + 1}: {k!r} is a {type(r.get(k)).__name__}, expected a string "
                                  "or a conversation (a list of {role, content} messages)")
        out.append(_texts_of(r))
    if not out:
        raise ConfigError(f"{what}: no pairs found")
    if 0 < sum(isinstance(p, dict) for p in out) < len(out):
        raise ConfigError(f"{what}: some pairs are conversations and some texts: give one form")
    return out


def _render(tokenizer, pairs: list, what: str) -> tuple[list[tuple[str, str]], bool]:
    """(pairs as (chosen, rejected) texts, whether they are rendered conversations). A conversation is the
    prompt's messages then the chosen (rejected) ones, rendered whole with the tokenizer's chat template,
    as TRL's RewardTrainer renders conversational pairs; its text is tokenized without adding special
    tokens again (the template has them), as a PPO prompt is."""
    if not pairs or not isinstance(pairs[0], dict):
        return pairs, False
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{what}: the pairs are conversations, but the base's tokenizer has no chat template: "
                          "give it one (tokenizer_config.json chat_template) or give texts")
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
    return [(render(p["prompt"] + p["chosen"]), render(p["prompt"] + p["rejected"])) for p in pairs], True


def _pairs(cfg: RewardConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, held-out pairs) as (chosen text, rejected text)."""
    if cfg.pairs == "embedded":
        from marl_ray.data.domain import preference_pairs

        train = preference_pairs(cfg.n_pairs, seed=cfg.seed, split="train")
        held = preference_pairs(cfg.n_eval_pairs, seed=cfg.seed, split="eval")
        return _check_rows(train, "pairs"), _check_rows(held, "pairs")
    rows = common.load_rows(cfg.pairs, ["chosen", "rejected"], "pairs", cfg.pairs_split)
    train = _check_rows(rows, "pairs")
    if cfg.eval_pairs:
        held = _check_rows(common.load_rows(cfg.eval_pairs, ["chosen", "rejected"], "eval_pairs"), "eval_pairs")
        return train, held
    return common.split_rows(train, cfg.eval_fraction, cfg.seed, "pairs")


def _tokenize(tokenizer, pairs, max_len: int, add_special_tokens: bool = True):
    from datasets import Dataset

    enc = lambda texts: tokenizer(texts, truncation=True, max_length=max_len,  # noqa: E731
                                  add_special_tokens=add_special_tokens)["input_ids"]
    return Dataset.from_dict({"chosen_ids": enc([c for c, _ in pairs]), "rejected_ids": enc([r for _, r in pairs])})


def _base_path(base: str) -> str:
    """`base` as a path or hub id to load: a .gguf file is dequantized once into a model folder."""
    from marl_ray.model.gguf import GGUFError, resolve_base

    try:
        return resolve_base(base)
    except GGUFError as e:
        raise ConfigError(f"base: {e}") from None


def load_reward_model(base: str, quantization: str = "none", seed: int = 0):
    """(AutoModelForSequenceClassification with num_labels=1, tokenizer, base fingerprint) of `base`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from marl_ray.model.adapter_io import base_fingerprint
    from marl_ray.model.loading import keep_4bit_layout, quantization_config

    kwargs = {"dtype": torch.float32, "num_labels": 1}
    qcfg = quantization_config(quantization, torch.float32)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    set_seed(seed)  # the new score head is initialised at load time
    with common.quiet_transformers():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise ConfigError(f"base: cannot load {base!r} as a sequence classifier: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    keep_4bit_layout(model)
    model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the score at the last non-pad token
    return model, tokenizer, base_fingerprint(model)


def pairwise_scores(model, tokenizer, pairs, batch_size: int = 64, add_special_tokens: bool = True):
    """(chosen scores, rejected scores) as float lists, read at each text's last real token."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for which in (0, 1):
                texts = [p[which] for p in pairs]
                scores = []
                for i in range(0, len(texts), batch_size):
                    enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                    max_length=tokenizer.model_max_length,
                                    add_special_tokens=add_special_tokens).to(model.device)
                    logits = model(**enc).logits[:, 0].float()  # (B,) at the last non-pad token
                    scores += logits.tolist()
                out.append(scores)
    finally:
        model.train(was_training)
    return out[0], out[1]


def _accuracy(chosen, rejected) -> float:
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def _pearson(xs, ys) -> float | None:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sxx * syy) ** 0.5


def run_reward(cfg: RewardConfig, callbacks: Sequence = ()) -> dict:
    """Train stage 2 into cfg.out_dir; returns the summary with `reward_accuracy` (held-out) and `adapter`.

    `callbacks` are extra transformers TrainerCallbacks (progress hooks; tests interrupt with one).
    """
    with common.quiet_progress(), console.log_file(Path(cfg.out_dir).expanduser()):
        return _run_reward(cfg, callbacks)


def _run_reward(cfg: RewardConfig, callbacks: Sequence) -> dict:
    import torch
    from peft import get_peft_model
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from marl_ray.model.adapter_io import META_FILE, atomic_dir

    t0 = time.perf_counter()
    common.check_local_base(cfg.base, "base")
    base = _base_path(cfg.base)  # a .gguf file: dequantized once into a model folder
    common.check_targets(base, cfg.lora.target_modules, "lora.target_modules")
    train_pairs, held_pairs = _pairs(cfg)  # data errors (a bad JSONL line) before any model work
    chat = isinstance(train_pairs[0], dict) or isinstance(held_pairs[0], dict)
    if chat:  # conversations: rendered with the base's chat template, still before any model work
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        train_pairs, _ = _render(tok, train_pairs, "pairs")
        held_pairs, _ = _render(tok, held_pairs, "eval_pairs" if cfg.eval_pairs else "pairs")
    ckpt_dir, resume_from, done = common.prepare_out_dir(cfg, "reward", "adapter")
    if done is not None:
        log.info("reward already finished in %s (same config): nothing to do; --set resume=false retrains",
                 cfg.out_dir)
        return done
    model, tokenizer, fingerprint = load_reward_model(base, cfg.quantization, cfg.seed)
    tokenizer.model_max_length = cfg.max_len
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, common.lora_config(cfg.lora, "SEQ_CLS", model))
    init_acc = None if resume_from else _accuracy(*pairwise_scores(model, tokenizer, held_pairs, cfg.batch_size,
                                                                   add_special_tokens=not chat))
    args = common.trainer_args(TRLRewardConfig, cfg, ckpt_dir, cfg.steps, cfg.epochs, max_length=None,
                               center_rewards_coefficient=None)
    with common.quiet_transformers():
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=_tokenize(tokenizer, train_pairs, cfg.max_len, not chat),
                                callbacks=list(callbacks))
    console.route_trainer_logs(trainer, console.progress(cfg.progress))
    common.keep_adapters_fp32(trainer.model)
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    model = trainer.model
    chosen, rejected = pairwise_scores(model, tokenizer, held_pairs, cfg.batch_size, add_special_tokens=not chat)
    accuracy = _accuracy(chosen, rejected)
    oracle_corr = None
    if cfg.pairs == "embedded":
        from marl_ray.data.domain import oracle_score

        texts = [c for c, _ in held_pairs] + [r for _, r in held_pairs]
        oracle_corr = _pearson(chosen + rejected, [oracle_score(t) for t in texts])

    target = Path(cfg.out_dir).expanduser() / "adapter"
    with atomic_dir(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        model.save_pretrained(str(tmp))
        meta = {"role": "reward", "base_fingerprint": fingerprint, "quantization": cfg.quantization,
                "dtype": "float32", "num_labels": 1}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    margins = [c - r for c, r in zip(chosen, rejected)]
    summary = {
        "stage": "reward", "adapter": str(target), "base": cfg.base, "base_fingerprint": fingerprint,
        "reward_accuracy": accuracy, "reward_accuracy_init": init_acc, "oracle_corr": oracle_corr,
        "eval_margin_mean": sum(margins) / len(margins), "n_train_pairs": len(train_pairs),
        "n_eval_pairs": len(held_pairs), "steps": out.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "first_train_loss": losses[0] if losses else None, "final_train_loss": losses[-1] if losses else None,
        "wall_s": time.perf_counter() - t0,
    }
    return common.finish_out_dir(cfg, "reward", summary, trainer.state.log_history)


def main_reward(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="marl-ray reward",
        description="Stage 2: train a LoRA reward adapter + score head on preference pairs (Bradley-Terry loss) on "
                    "the SFT base, and report its held-out pairwise accuracy. Writes OUT_DIR/adapter, a peft "
                    "SEQ_CLS folder in TRL RewardTrainer's format that stage 3 loads as rewards[i].path. "
                    "An interrupted run resumes when rerun with the same config.")
    add_config_args(parser, RewardConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, RewardConfig)
    s = run_reward(cfg)
    init = f" (before training {s['reward_accuracy_init']:.3f})" if s.get("reward_accuracy_init") is not None else ""
    corr = f", correlation with the oracle {s['oracle_corr']:.2f}" if s.get("oracle_corr") is not None else ""
    print(f"reward done: {s['steps']} steps, held-out pairwise accuracy {s['reward_accuracy']:.3f}{init} on "
          f"{s['n_eval_pairs']} pairs{corr} -> {s['adapter']}")
    return 0
