"""The console: one progress bar per stage and no trainer dicts on it (they go to the stage's log.txt);
--quiet (no bars, warnings and errors only) and --log-level, anywhere on the command line."""

import os
import subprocess
import sys

import pytest

from marl_ray.cli import console_flags

SFT = ["sft", "--set", "size=tiny", "--set", "corpus_size=300", "--set", "steps=12", "--set", "batch_size=16",
       "--set", "max_len=32", "--set", "warmup_steps=2", "--set", "samples=0", "--set", "progress=true"]


def _run(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "marl_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_console_flags_are_taken_from_anywhere():
    assert console_flags(["sft", "--set", "steps=2"]) == (["sft", "--set", "steps=2"], "INFO", False)
    assert console_flags(["--quiet", "ppo", "--log-level", "debug"]) == (["ppo"], "debug", True)
    assert console_flags(["demo", "-q", "--log-level=WARNING", "--quick"]) == (["demo", "--quick"], "WARNING", True)


def test_bad_log_level_is_refused(tmp_path):
    proc = _run(["--log-level", "LOUD", "sft", "--help"], tmp_path)
    assert proc.returncode == 2 and "--log-level must be one of DEBUG, INFO, WARNING, ERROR" in proc.stderr


def test_trainer_dicts_go_to_the_log_file_not_the_console(tmp_path):
    proc = _run([*SFT, "--set", f"out_dir={tmp_path / 'a'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "'loss'" not in console and "train_runtime" not in console
    assert "12/12" in proc.stderr  # the training bar
    assert "sft done: 12 steps" in proc.stdout
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "'loss'" in log and "train_runtime" in log and "eval_loss" in log


def test_quiet_shows_no_bars(tmp_path):
    proc = _run(["--quiet", *SFT, "--set", f"out_dir={tmp_path / 'q'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s]" not in proc.stderr and "12/12" not in proc.stderr and " INFO " not in proc.stderr
    assert "sft done: 12 steps" in proc.stdout  # the result is still said
    assert "'loss'" in (tmp_path / "q" / "log.txt").read_text()
