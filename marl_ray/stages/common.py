"""What the training stages (SFT, reward) share: their output folder, resumable checkpoints, data files.

An output folder `out_dir` of a stage holds

    config.yaml          the resolved config of the last run
    checkpoints/         Trainer checkpoints (checkpoint-N) + run.json, while a run is unfinished
    base/ or adapter/    the result, written atomically (temp folder + rename): whole or absent
    train_log.jsonl      the Trainer's log history
    log.txt              the stage's log (INFO and above, the Trainer's log dicts included), appended to
    <stage>_summary.json written last: its presence means the stage finished

A rerun with the same training config resumes from the newest *complete* checkpoint (Trainer writes
trainer_state.json last, so a checkpoint without it was cut off mid-save and is dropped), or returns
the summary at once when the stage had already finished. A rerun with a different config is refused
unless `resume` is false, which discards the old checkpoints and starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from marl_ray import console
from marl_ray.config import ConfigError, save_config, to_dict

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Config fields that do not change what is trained: a rerun may change them and still resume.
NON_TRAINING_FIELDS = frozenset({"out_dir", "resume", "progress", "save_every", "keep_last", "samples"})


def training_fields(cfg: Any) -> dict:
    """The config as a plain dict, without the fields a resumed run may change."""
    return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in NON_TRAINING_FIELDS}


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def remove_stale_temps(out: Path, names: Iterable[str]) -> None:
    """Remove temp/old folders that `adapter_io.atomic_dir` leaves when a process is killed mid-write."""
    for name in names:
        for stale in list(out.glob(f".{name}.tmp-*")) + list(out.glob(f".{name}.old-*")):
            log.info("removing %s left by an interrupted write", stale)
            shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json (written last by Trainer) parses; incomplete
    checkpoints (cut off mid-save) are deleted so Trainer never picks one up."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))), reverse=True)
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, json.JSONDecodeError):
            log.warning("dropping incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    return None


def prepare_out_dir(cfg: Any, stage: str, result: str) -> tuple[Path, Path | None, dict | None]:
    """Set up `cfg.out_dir` for `stage`: (checkpoint folder, checkpoint to resume from, finished summary).

    The summary is not None when the stage already finished with the same training config (and
    `cfg.resume` is true): the caller then returns it without training again.
    """
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, [result])
    ckpt_dir = out / CHECKPOINTS
    want = {"stage": stage, "config": training_fields(cfg)}
    summary_file = out / f"{stage}_summary.json"
    if not cfg.resume:
        if ckpt_dir.exists():
            log.info("resume=false: discarding %s", ckpt_dir)
            shutil.rmtree(ckpt_dir)
        summary_file.unlink(missing_ok=True)
    else:
        if summary_file.exists() and (out / result).is_dir():
            try:
                done = json.loads(summary_file.read_text())
            except json.JSONDecodeError:
                done = None
            if done and done.get("config") == want["config"]:
                return ckpt_dir, None, done
        run_file = ckpt_dir / RUN_FILE
        if run_file.exists():
            try:
                have = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                have = None
            if have is None or have.get("stage") != stage:
                raise ConfigError(f"out_dir: {ckpt_dir} holds checkpoints that are not from a `{stage}` run; "
                                  "use another out_dir, or --set resume=false to discard them")
            changed = _diff(have.get("config", {}), want["config"])
            if changed:
                raise ConfigError(
                    f"out_dir: {ckpt_dir} holds checkpoints of an unfinished run with a different config "
                    f"({', '.join(changed)} changed); rerun with the same config to resume it, "
                    "--set resume=false to discard it and start over, or use another out_dir")
        elif ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # no run.json: cut off before anything resumable was written
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ckpt_dir / RUN_FILE, want)
    save_config(cfg, out / "config.yaml")
    resume_from = complete_checkpoint(ckpt_dir)
    if resume_from is not None:
        log.info("resuming %s from %s", stage, resume_from)
    return ckpt_dir, resume_from, None


def finish_out_dir(cfg: Any, stage: str, summary: dict, log_history: Sequence[dict]) -> dict:
    """Record the finished stage (summary written last, atomically) and drop the checkpoints."""
    out = Path(cfg.out_dir).expanduser()
    summary = {**summary, "config": training_fields(cfg)}
    with (out / "train_log.jsonl").open("w") as f:
        for row in log_history:
            f.write(json.dumps(row) + "\n")
    write_json_atomic(out / f"{stage}_summary.json", summary)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return summary


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- data


def load_rows(source: str, required: Sequence[str], what: str, split: str = "train") -> list[dict]:
    """Rows of a JSONL file (errors name the line) or of a `datasets` data set name / local folder."""
    from marl_ray.data.domain import read_jsonl

    path = Path(source).expanduser()
    if path.is_file():
        try:
            return read_jsonl(path, required=required)
        except ValueError as e:  # names the file and line; a ConfigError prints without a traceback
            raise ConfigError(f"{what}: {e}") from None
    if source.endswith((".jsonl", ".json")) or source.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"{what}: {source!r} does not exist (a JSONL file, a `datasets` name, or 'embedded')")
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # not found, no network, bad split: one message naming the field
        raise ConfigError(f"{what}: cannot load {source!r} as a JSONL file or a `datasets` data set "
                          f"(split {split!r}): {e}") from e
    missing = [k for k in required if k not in ds.column_names]
    if missing:
        raise ConfigError(f"{what}: data set {source!r} has no column(s) {', '.join(map(repr, missing))}; "
                          f"it has {ds.column_names}")
    return [dict(r) for r in ds]


def split_rows(rows: list, eval_fraction: float, seed: int, what: str) -> tuple[list, list]:
    """A seeded (train, held-out) split; the held-out part has at least one row."""
    import random

    if len(rows) < 2:
        raise ConfigError(f"{what}: need at least 2 rows to hold some out, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# ------------------------------------------------------------------------------------ model bits


@contextlib.contextmanager
def quiet_transformers():
    """Silence load-time chatter (missing score head, unused lm_head, ...) that is expected here."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def keep_adapters_fp32(model) -> None:
    """Undo TRL's cast of a quantized base's trainable weights to bf16 (QLoRA's GPU recipe): adapters
    and heads stay fp32 here, as stage 3 keeps them. Call before `train()` builds the optimizer."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def lora_config(spec, task_type: str, model):
    """peft's LoraConfig of a LoraSpec for `model` (target_modules null: the architecture's default)."""
    from peft import LoraConfig

    from marl_ray.model import targets

    try:
        modules = targets.resolve(spec.target_modules, model, "lora.target_modules")
    except targets.TargetModulesError as e:
        raise ConfigError(str(e)) from None
    return LoraConfig(task_type=task_type, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=modules, fan_in_fan_out=targets.conv1d_only(modules, model))


def check_targets(base: str, target_modules, field: str) -> None:
    """Refuse LoRA target names that match nothing in a local base folder, before anything is loaded or
    written (the error names the base's linear layers)."""
    from marl_ray.model import targets

    try:
        targets.check_base(base, target_modules, field)
    except targets.TargetModulesError as e:
        raise ConfigError(str(e)) from None


def trainer_args(cls, cfg, ckpt_dir: Path, steps: int | None, epochs: float, **extra):
    """The TRL config `cls` (a TrainingArguments) with what the SFT and reward stages share.

    TRL's defaults are GPU-minded: activation checkpointing and bf16 are on. Here both are off unless
    asked for (cfg.bf16); on a CPU they only slow small models down.
    """
    import dataclasses

    import torch

    save = cfg.save_every > 0
    names = {f.name for f in dataclasses.fields(cls)}
    # transformers >= 5.x renamed gradient_checkpointing (its old name now warns)
    ckpt_flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kw = dict(
        output_dir=str(ckpt_dir), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, weight_decay=0.0,
        max_grad_norm=1.0, num_train_epochs=epochs, max_steps=steps if steps else -1,
        save_strategy="steps" if save else "no", save_steps=cfg.save_every if save else 500,
        save_total_limit=cfg.keep_last, eval_strategy="no", logging_steps=10, logging_first_step=True,
        report_to="none", disable_tqdm=not console.progress(cfg.progress), dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), bf16=cfg.bf16, **{ckpt_flag: False},
    )
    if cfg.bf16 and not torch.cuda.is_available():
        kw["use_cpu"] = True  # Trainer refuses bf16 without an accelerator unless told to use the CPU
    kw.update(extra)
    return cls(**kw)


@contextlib.contextmanager
def quiet_progress():
    """Hide the per-call progress bars of `datasets` maps and of model loading/saving while a stage runs
    (the training bar, Trainer's own, stays)."""
    import datasets
    from transformers.utils import logging as hf_logging

    ds_on = datasets.is_progress_bar_enabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    bnb_log = logging.getLogger("bitsandbytes")  # warns on every 8-bit matmul that fp32 is cast to fp16
    bnb_level = bnb_log.level
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    bnb_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # transformers 5 renames TRL still calls (gradient -> activation checkpointing)
            warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")
            yield
    finally:
        bnb_log.setLevel(bnb_level)
        if ds_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def check_local_base(base: str, field: str) -> None:
    """A clear error for a base path that is missing or is a stage's output folder, not a model folder."""
    p = Path(base).expanduser()
    if not p.exists():
        if base.startswith((".", "/", "~")) or base.count("/") > 1:
            raise ConfigError(f"{field}: {base!r} does not exist (a model folder such as runs/sft/base, or a hub id)")
        return  # a hub id
    if p.is_dir() and not (p / "config.json").exists():
        if (p / "base" / "config.json").exists():
            raise ConfigError(f"{field}: {base!r} is an SFT output folder; use {str(p / 'base')!r}")
        raise ConfigError(f"{field}: {base!r} has no config.json: not a Hugging Face model folder")
