"""The console: one progress bar per stage and no trainer dicts on it (they go to the stage's log.txt);
--quiet (no bars, warnings and errors only) and --log-level, anywhere on the command line."""

import io
import os
import subprocess
import sys
import time

import pytest

from marl_ray.cli import console_flags
from marl_ray.config import ConfigError

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


# ---------------------------------------------------------------- run.progress: auto, true, false


RL_REWARD = '''
import time


def slow_vowels(prompts, completions, **kwargs):
    """The fraction of vowels; a quarter of a second per call, so that steps are apart in time."""
    time.sleep(0.25)
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    """A tiny two-policy RL config (in-process runtime, a function reward, 3 steps), run.progress unset."""
    import yaml

    import reliability_utils as ru
    from marl_ray.data.tiny import build_tiny

    root = tmp_path_factory.mktemp("progress")
    build_tiny(root / "base", texts=ru.TEXTS, size="tiny", seed=0)
    ru.write_prompts(root / "prompts.jsonl", ru.PROMPTS)
    (root / "slow.py").write_text(RL_REWARD)
    cfg = {"model": {"base": str(root / "base")},
           "rewards": [{"name": "v", "function": f"{root / 'slow.py'}:slow_vowels"}],
           "policies": [{"name": "a", "reward": "v", "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
                        {"name": "b", "reward": "v", "algorithm": "grpo", "num_generations": 2, "lr": 1e-3,
                         "lora": {"r": 4, "alpha": 8}}],
           "generation": {"max_new_tokens": 4},
           "ppo": {"steps": 3, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1},
           "cluster": {"runtime": "inprocess", "rollout_workers": 1, "host_num_cpus": 1},
           "data": {"prompts": str(root / "prompts.jsonl")},
           "run": {"out_dir": str(root / "out"), "tensorboard": False}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _rl(root, *args, stderr=subprocess.PIPE):
    """`python -m marl_ray rl` on rl_run's config, stdout a pipe, block-buffered (no PYTHONUNBUFFERED): each
    stdout line with the time it arrived, and stderr (when piped)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "marl_ray", *args, "rl", "--config", str(root / "cfg.yaml"),
                             "--set", f"run.out_dir={root / 'out'}"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    err = []
    if stderr is subprocess.PIPE:
        import threading

        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
        reader.start()
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    assert proc.wait(timeout=300) == 0, "".join(err)[-3000:]
    if stderr is subprocess.PIPE:
        reader.join()
    return lines, "".join(err)


def test_progress_auto_follows_the_terminal(monkeypatch):
    from marl_ray import console
    from marl_ray.config import PPORunConfig, RunSpec, load_config

    assert RunSpec().progress == "auto"
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert console.progress("auto") is True and console.progress(True) is True
            assert console.progress(False) is False
            monkeypatch.setattr(console, "_state", {"quiet": True})
            assert console.progress("auto") is False and console.progress(True) is False  # --quiet: never
    finally:
        os.close(master)
        os.close(slave)
    monkeypatch.setattr(console, "_state", {"quiet": False})
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file, as under `ray job submit`
    assert console.progress("auto") is False and console.progress(True) is True
    base = {"model": {"base": "b"}, "rewards": [{"name": "r", "path": "r"}], "policies": [{"name": "p", "reward": "r"}]}
    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(PPORunConfig, None, [f"run.progress={value}"], base=base).run.progress == want
    for value, got in (("sometimes", "'sometimes' is not one of auto or a bool"), ("2", "2 is not one of auto"),
                       ("null", "expected bool or auto, got null")):
        with pytest.raises(ConfigError, match=f"^run.progress: {got}"):
            load_config(PPORunConfig, None, [f"run.progress={value}"], base=base)


def test_without_a_terminal_each_policy_gets_a_line_per_step_as_it_ends(rl_run):
    """stdout and stderr are pipes (a log file, as under `ray job submit`): no bar, and one line per policy
    per step, flushed when the step ends (steps are >= 0.5 s apart here: the lines arrive apart too)."""
    lines, err = _rl(rl_run)
    steps = [(t, line) for t, line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for _, line in steps] == [f"step {s} policy {p}" for s in range(3) for p in "ab"]
    assert all("objective/scores=" in line for _, line in steps)
    assert steps[2][0] - steps[0][0] > 0.3 and steps[4][0] - steps[2][0] > 0.3, steps  # written as they happen
    assert lines[-1][1].startswith("done: 3 steps")
    assert "%|" not in err and "it/s]" not in err and "\r" not in err  # no bar


def test_on_a_terminal_a_bar_and_no_lines(rl_run):
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a width: tqdm draws nothing in 0
    try:
        chunks = []
        import threading

        def read():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the terminal's other end closed
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        lines, _ = _rl(rl_run, stderr=slave)
        os.close(slave)
        slave = None
        reader.join(timeout=30)
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    tty = b"".join(chunks).decode(errors="replace")
    assert "ppo: 100%" in tty and "3/3" in tty, tty[-2000:]
    assert not [line for _, line in lines if line.startswith("step ")]
    assert lines[-1][1].startswith("done: 3 steps")


def test_quiet_prints_neither_bar_nor_step_lines(rl_run):
    lines, err = _rl(rl_run, "--quiet")
    assert [line for _, line in lines] == [lines[-1][1]] and lines[-1][1].startswith("done: 3 steps")
    assert "%|" not in err and " INFO " not in err
