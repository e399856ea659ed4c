"""The command line's names: stage 3 is `marl-ray rl` (it runs every algorithm), `marl-ray ppo` its earlier
name, the same command with the same options; `--help` of either names the algorithms as the config does."""

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from marl_ray.config import PolicySpec
from marl_ray.config.schema import ALGORITHMS

MARL_RAY = Path(sys.executable).with_name("marl-ray")  # the installed entry point


def _help(*args):
    proc = subprocess.run([str(MARL_RAY), *args, "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="100"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return " ".join(proc.stdout.split())  # one line: argparse wraps wherever it likes


def _options(text):
    return sorted(w for w in text.split() if w.startswith("--"))


@pytest.mark.parametrize("name", ["rl", "ppo"])
def test_rl_and_ppo_help_list_the_algorithms(name):
    text = _help(name)
    assert text.startswith(f"usage: marl-ray {name} ")
    losses = get_args(get_type_hints(PolicySpec)["loss_type"])
    assert set(ALGORITHMS) == {"ppo", "grpo", "rloo", "reinforce_pp"} and set(losses) == {"grpo", "dapo", "dr_grpo"}
    assert f"policies[].algorithm: {', '.join(ALGORITHMS)};" in text
    assert f"policies[].loss_type: {', '.join(losses)}" in text
    assert "DAPO" in text and "Dr. GRPO" in text
    other = "ppo" if name == "rl" else "rl"
    assert ("earlier name" in text) and ("marl-ray ppo" in text)
    assert _options(text) == _options(_help(other))  # the same options (config fields included)


def test_the_top_level_help_names_rl():
    text = _help()
    assert "rl: stage 3" in text and "ppo: the same as rl" in text
    assert "{demo,ppo,reward,rl,sft}" in text


def test_python_m_marl_ray_rl_takes_the_same_arguments(tmp_path):
    """`python -m marl_ray rl` (the `ray job submit` form): a bad config is refused by name under either name."""
    for name in ("rl", "ppo"):
        proc = subprocess.run([sys.executable, "-m", "marl_ray", name, "--set", "model.base=/nonexistent/base",
                               "--set", "policies=[]"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"marl-ray {name}: config error: " in proc.stderr
