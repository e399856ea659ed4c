"""Reliability: interrupted and resumed runs, lost actors, crashed checkpoint writes, NaN rewards,
mismatching checkpoints and bad inputs.

Every run is tiny (a 2-layer H=64 Llama, 4 prompts x 2 policies x 6 new tokens per step). One
uninterrupted in-process run (`baseline`) is the reference that interrupted, resumed and
actor-killing runs of the same config and seed must reproduce step for step. The Ray test binds
Ray to 127.0.0.1 with a private temp dir and a throw-away auth token, and checks that none of
its processes outlive it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import reliability_utils as ru
from marl_ray.train import checkpoint

POLICIES = ["up", "down"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return ru.build_assets(tmp_path_factory.mktemp("rel_assets"))


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory) -> dict:
    """An uninterrupted in-process run of the shared config: its out dir and summary (read only)."""
    from marl_ray.stages.ppo import run_ppo

    out = tmp_path_factory.mktemp("rel_baseline") / "run"
    summary = run_ppo(ru.load(ru.run_config(assets, out)))
    ru.assert_ledger_clean(summary["ledger"], 4, 4)
    return {"out": out, "summary": summary, "metrics": ru.metrics_by_step(out)}


def _assert_reproduces(out: Path, summary: dict, baseline: dict):
    ru.assert_same_metrics(ru.metrics_by_step(out), baseline["metrics"])
    ru.assert_same_policies(out / "policies", baseline["out"] / "policies", POLICIES)
    assert summary["ledger"] == baseline["summary"]["ledger"]
    assert summary["steps"] == 4


# ---------------------------------------------------------------------------- 1. kill the driver, --resume
# A learning-rate schedule with warm-up: linear over the run's 8 optimizer steps, 2 of warm-up.
SCHEDULE = {"lr_scheduler_type": "linear", "warmup_steps": 2}


def _scheduled(cfg: dict) -> dict:
    for p in cfg["policies"]:
        p.update(SCHEDULE)
    return cfg


@pytest.mark.parametrize("runtime, schedule", [
    pytest.param("inprocess", False, id="inprocess"), pytest.param("ray", False, id="ray"),
    pytest.param("inprocess", True, id="inprocess-linear-warmup", marks=pytest.mark.slow)])  # ~35 s
def test_killed_driver_resumes_to_the_same_result(assets, baseline, tmp_path, runtime, schedule):
    """SIGKILL `marl-ray ppo` once checkpoint step-000002 exists, rerun it with --resume: metrics
    step for step, ledger and final adapters equal an uninterrupted run's. With the Ray runtime
    the driver starts a private Ray on loopback; none of its processes outlive the test. With a
    linear schedule and warm-up the resumed steps use the uninterrupted run's learning rates (the
    `lr` metric) and end with its weights: the checkpoint carries the schedule."""
    out = tmp_path / "run"
    cfg = ru.run_config(assets, out, cluster={"runtime": runtime})
    if schedule:
        from marl_ray.stages.ppo import run_ppo

        want = tmp_path / "uninterrupted"
        summary = run_ppo(ru.load(_scheduled(ru.run_config(assets, want))))
        baseline = {"out": want, "summary": summary, "metrics": ru.metrics_by_step(want)}
        lrs = [baseline["metrics"][(s, "up")]["lr"] for s in range(4)]  # each step's last update: 2 s + 1
        assert lrs == pytest.approx([1e-3 * x for x in (0.5, 5 / 6, 3 / 6, 1 / 6)], rel=1e-12)
        cfg = _scheduled(cfg)
    cfg = ru.write_yaml(tmp_path / "cfg.yaml", cfg)
    log1, log2 = tmp_path / "first.log", tmp_path / "resumed.log"
    ray_tmp = tempfile.mkdtemp(prefix="rrel", dir="/tmp") if runtime == "ray" else None
    env = ru.cli_env(**(ru.private_ray_env(ray_tmp) if ray_tmp else {}))
    proc = None
    try:
        proc = ru.start_cli(["ppo", "--config", str(cfg)], log1, env=env)
        ru.wait_for(lambda: (out / "checkpoints" / "step-000002").is_dir(), 240, proc,
                    what="checkpoint step-000002")
        os.kill(proc.pid, signal.SIGKILL)  # the driver only (its Ray goes down with it)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, log1.read_text()[-3000:]
        assert not (out / "ppo_summary.json").exists(), "the run finished before it was killed"
        if ray_tmp:
            ru.stop_ray_procs(ray_tmp)
        kept = [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(out)]
        assert kept and 2 <= kept[-1] < 4, kept

        done = subprocess.run([sys.executable, "-m", "marl_ray", "ppo", "--config", str(cfg), "--resume"],
                              cwd=str(ru.REPO), env=env, capture_output=True, text=True, timeout=400)
        log2.write_text(done.stdout + done.stderr)
        assert done.returncode == 0, log2.read_text()[-3000:]
        assert f"(step {kept[-1]})" in log2.read_text() and "resumed from" in log2.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if ray_tmp:
            ru.stop_ray_procs(ray_tmp)
            assert not ru.ray_procs(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((out / "ppo_summary.json").read_text())
    # Steps before the checkpoint come from the first run's metrics.jsonl, the rest from the resumed run.
    _assert_reproduces(out, summary, baseline)
    ru.assert_ledger_clean(summary["ledger"], 4, 4)


# ---------------------------------------------------------------------------- 2. lose actors on Ray
@pytest.fixture
def local_ray():
    with ru.private_local_ray(num_cpus=2) as tmp:
        yield tmp


@pytest.mark.parametrize("hosts", [1, 2])
def test_lost_host_and_workers_are_recovered_on_ray(assets, baseline, local_ray, tmp_path, monkeypatch, caplog, hosts):
    """Kill the host between steps 0 and 1 (step 1's first call fails); worker 1 as it starts step 2's
    rollout and the host as it starts decoding the redo of that same step (two faults within one step,
    each armed at its named point: runtime/faults.py); worker 0
    after step 2, waiting until Ray has restarted it (only its new pid shows that its stream position
    was lost: the checkpoint after step 2 is refused, restored and written again); and worker 1 while
    that checkpoint's files are written (the checkpoint is whole; step 3 finds the worker gone and is
    redone). The run must still reproduce the uninterrupted run: same ledger, metrics and adapters,
    and the checkpoint holds the uninterrupted run's state after step 2. With two hosts (both on the
    one node: gradients allreduced in the hosts' group, rows kept where they were sampled) host 0 is
    the one killed, and the run must reproduce an uninterrupted two-host run."""
    from marl_ray.runtime.handles import get
    from marl_ray.stages.ppo import run_ppo
    from marl_ray.train.loop import Learner

    out = tmp_path / "run"
    cluster = {"runtime": "ray", "max_restarts": 3}
    if hosts == 2:
        cluster.update(num_hosts=2, hosts_per_node=2)
        want = tmp_path / "uninterrupted"
        summary = run_ppo(ru.load(ru.run_config(assets, want, cluster=cluster, run={"save_every": 3})))
        assert len(summary["hosts"]) == 2 and summary["recoveries"] == 0
        baseline = {"out": want, "summary": summary, "metrics": ru.metrics_by_step(want)}
    cfg = ru.load(ru.run_config(assets, out, cluster=cluster, run={"save_every": 3}))
    seen, killed = {}, []

    def kill(pid, what):
        os.kill(pid, signal.SIGKILL)
        killed.append(what)

    def pids(learner):
        return get(learner.hosts[0].info.remote())["pid"], get([w.pid.remote() for w in learner.workers])

    real_rollout = Learner.rollout
    tries = {}

    def rollout(self):
        tries[self.step] = tries.get(self.step, 0) + 1
        if self.step == 2 and tries[2] <= 2:  # first try: worker 1 dies; second try: the host dies
            if tries[2] == 1:
                get(self.workers[1].arm_fault.remote("rollout"))  # as it starts its share of the rollout
                killed.append("worker 1")
            else:
                get(self.hosts[0].arm_fault.remote("sample"))  # as it starts decoding
                killed.append("host")
        return real_rollout(self)

    monkeypatch.setattr(Learner, "rollout", rollout)
    real_save = checkpoint.save

    def save(*args, **kwargs):  # worker 1 dies while the files of the checkpoint after step 2 are written
        if not any(w == "worker 1 (checkpoint)" for w in killed):
            kill(pids(seen["learner"])[1][1], "worker 1 (checkpoint)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)

    def on_start(learner):
        seen["learner"] = learner
        seen["host"], seen["workers"] = pids(learner)
        mine = {p.pid for p in ru.ray_procs(local_ray)}
        assert seen["host"] in mine and set(seen["workers"]) <= mine, "actors not found by their temp dir"

    def on_step(step, metrics):
        learner = seen["learner"]
        if step == 0 and "host" not in killed:  # one host: the run goes back to its start and redoes step 0
            kill(seen["host"], "host")
        elif step == 2:
            w0 = pids(learner)[1][0]
            kill(w0, "worker 0")
            deadline = time.monotonic() + 120
            while True:  # until Ray has restarted it: the learner's next call then succeeds silently
                try:
                    if get(learner.workers[0].pid.remote()) != w0:
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "worker 0 was not restarted"
                time.sleep(0.2)

    with caplog.at_level(logging.WARNING, logger="marl_ray.train"):
        summary = run_ppo(cfg, on_start=on_start, on_step=on_step)
    assert killed == ["host", "worker 1", "host", "worker 0", "worker 1 (checkpoint)"], killed
    assert seen["learner"].hosts.collective == (hosts == 2)
    assert tries[2] == 3, tries
    assert summary["recoveries"] == 5, caplog.text
    assert "lost while saving step 3 (ActorRestarted)" in caplog.text  # worker 0: caught by its pid alone
    if hosts == 2:  # host 0 came back empty and took host 1's snapshot, host to host; nothing went back further
        assert "host(s) [0] refilled with step 1's state from a peer" in caplog.text, caplog.text
        assert "host(s) [0] refilled with step 2's state from a peer" in caplog.text, caplog.text
        assert "no host holds" not in caplog.text
    else:  # the one host held the only copy: back to the run's start (no checkpoint before step 3)
        assert caplog.text.count("no host holds the state of step") == 2, caplog.text
        assert "back to the run's start, step 0" in caplog.text
    ru.assert_ledger_clean(summary["ledger"], 4, 4)
    _assert_reproduces(out, summary, baseline)
    pids_now = [h["pid"] for h in summary["hosts"]]
    assert pids_now and pids_now[0] != seen["host"], "the host was not restarted"
    # the checkpoint written while worker 1 died is the uninterrupted run's state after step 2
    _, state, files = checkpoint.load(out / "checkpoints" / "step-000003")
    _, want, _ = checkpoint.load(baseline["out"] / "checkpoints" / "step-000003")
    assert state["step"] == 3 and state["workers"] == want["workers"] and state["ledger"] == want["ledger"]
    assert set(files) == set(POLICIES)


# ---------------------------------------------------------------------------- 3. crash while checkpointing
_CRASHING_SAVER = r"""
import os, signal, sys, shutil
import torch
from marl_ray.train import checkpoint

out, mode = sys.argv[1], sys.argv[2]

def data(step):
    gen = torch.Generator().manual_seed(step)
    files = {"up": {"adapter_model.safetensors": torch.randint(0, 255, (1 << 20,), generator=gen,
                                                                dtype=torch.uint8).numpy().tobytes(),
                    "value_head.safetensors": bytes([step]) * 1000}}
    return {"base_fingerprint": "fp", "policies": ["up"]}, {"step": step, "w": torch.arange(step + 3.0)}, files

def save(step):
    meta, state, files = data(step)
    return checkpoint.save(out, step, meta, state, files, "cfg: %d\n" % step, keep_last=2)

real_save, real_rmtree = torch.save, shutil.rmtree
if mode == "write":      # steps 1, 2 complete; killed half way through writing step 3's state
    save(1); save(2)
    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\x80\x02partial")
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = crash
    save(3)
elif mode == "prune":    # step 3 complete; killed half way through deleting the oldest (step 1)
    def crash(path, *a, **k):
        if "step-000001" in str(path):
            real_rmtree(os.path.join(path, "policies"))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *a, **k)
    shutil.rmtree = crash
    save(3)
raise SystemExit("not killed")
"""


def _saver(out: Path, mode: str):
    p = subprocess.run([sys.executable, "-c", _CRASHING_SAVER, str(out), mode], cwd=str(ru.REPO), env=ru.cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr


def _steps(out) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(out)]


def _strays(out) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoint_root(out).iterdir() if p.name.startswith("."))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    # Killed mid-write of step 3: its temp folder is left, never listed; step 2 is the latest and loads.
    _saver(out, "write")
    assert _steps(out) == [1, 2]
    assert [s.split(".tmp-")[0] for s in _strays(out)] == [".step-000003"]
    latest = checkpoint.resolve(out, "latest")
    assert latest.name == "step-000002"
    meta, state, files = checkpoint.load(latest)
    assert meta["step"] == 2 and meta["policies"] == ["up"] and state["step"] == 2
    assert torch.equal(state["w"], torch.arange(5.0))
    assert files["up"]["value_head.safetensors"] == bytes([2]) * 1000
    assert len(files["up"]["adapter_model.safetensors"]) == 1 << 20
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve(out, str(checkpoint.checkpoint_root(out) / _strays(out)[0]))

    # The next save removes the stray temp folder; killed while pruning step 1 (keep_last=2):
    # the half-deleted folder is no longer listed.
    _saver(out, "prune")
    assert _steps(out) == [2, 3]
    assert _strays(out) == [".step-000001.del"]
    assert checkpoint.load(checkpoint.resolve(out, "latest"))[1]["step"] == 3

    # A clean save leaves no stray folders.
    checkpoint.save(out, 4, {"base_fingerprint": "fp", "policies": []}, {"step": 4}, {}, "", keep_last=2)
    assert _steps(out) == [3, 4] and _strays(out) == []


# ---------------------------------------------------------------------------- 4. NaN rewards
def _inject_nan(monkeypatch, policy: str, steps):
    """Make scores_B of `policy`'s first row NaN at the given steps (every step if None)."""
    from marl_ray.train.loop import Learner

    real = Learner.evaluate

    def evaluate(self, batch):
        ev = real(self, batch)
        if steps is None or self.step in steps:
            ev.scores_B = ev.scores_B.clone()
            ev.scores_B[batch.rows(policy)[0]] = float("nan")
        return ev

    monkeypatch.setattr(Learner, "evaluate", evaluate)


def _finite_policy_files(folder: Path, name: str):
    for k, v in ru.policy_tensors(folder / name).items():
        assert torch.isfinite(v).all(), f"{name}: {k} is not finite"


def test_nan_reward_skips_that_policys_update(assets, tmp_path, monkeypatch):
    from marl_ray.stages.ppo import run_ppo

    _inject_nan(monkeypatch, "up", {1})
    out = tmp_path / "run"
    seen, sums = {}, []

    def on_step(step, metrics):
        sums.append(seen["learner"].checksums())

    summary = run_ppo(ru.load(ru.run_config(assets, out, ppo={"steps": 3}, run={"save_every": 0})),
                      on_start=lambda learner: seen.update(learner=learner), on_step=on_step)
    assert summary["skip_count"] == {"up": 1, "down": 0}
    m = ru.metrics_by_step(out)
    assert [m[(s, "up")]["skipped/nonfinite"] for s in range(3)] == [0, 1, 1]
    assert [m[(s, "down")]["skipped/nonfinite"] for s in range(3)] == [0, 0, 0]
    assert math.isnan(m[(1, "up")]["objective/scores"])  # the bad number is reported, not hidden
    assert sums[1]["up"] == sums[0]["up"], "the NaN step changed the policy's weights"
    assert sums[1]["down"] != sums[0]["down"] and sums[2]["up"] != sums[1]["up"]  # the rest trains on
    for p in POLICIES:
        _finite_policy_files(out / "policies", p)
        assert all(math.isfinite(v) for k, v in m[(2, p)].items() if k.startswith(("loss/", "policy/", "val/")))


def test_nan_every_step_stops_after_a_checkpoint(assets, tmp_path, monkeypatch):
    from marl_ray.train.loop import NonFiniteError
    from marl_ray.stages.ppo import run_ppo

    _inject_nan(monkeypatch, "up", None)
    out = tmp_path / "run"
    cfg = ru.load(ru.run_config(assets, out, ppo={"steps": 4, "max_nonfinite_steps": 2}, run={"save_every": 0}))
    with pytest.raises(NonFiniteError, match=r"\['up'\].*2 steps in a row") as err:
        run_ppo(cfg)
    assert _steps(out) == [2] and str(checkpoint.resolve(out, "latest")) in str(err.value)
    _, state, _ = checkpoint.load(checkpoint.resolve(out, "latest"))
    assert state["skip_count"] == {"up": 2, "down": 0} and state["step"] == 2
    for p in POLICIES:
        _finite_policy_files(out / "checkpoints" / "step-000002" / "policies", p)
    assert not (out / "ppo_summary.json").exists()


# ---------------------------------------------------------------------------- 5. mismatching checkpoints
def test_resume_refuses_a_mismatching_checkpoint(assets, baseline, tmp_path):
    from marl_ray.train.checkpoint import CheckpointMismatch
    from marl_ray.stages.ppo import run_ppo

    out = tmp_path / "run"
    shutil.copytree(baseline["out"], out)
    before = ru.tree_digest(out)

    other = ru.run_config(assets, out, policies=("up", "other"), run={"resume": "latest"})
    with pytest.raises(CheckpointMismatch) as err:
        run_ppo(ru.load(other))
    msg = str(err.value)
    assert "not in the checkpoint: ['other']" in msg and "not in the config: ['down']" in msg, msg

    # a reward adapter that names the other base (else the adapter itself is refused first: see
    # model/test_multi_adapter.py), so that the checkpoint's own check is what refuses
    rm = tmp_path / "rm_other"
    shutil.copytree(assets["reward"], rm)
    adapter_cfg = json.loads((rm / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = assets["other_base"]
    (rm / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    rebased = ru.run_config({**assets, "reward": str(rm)}, out, model={"base": assets["other_base"]},
                            run={"resume": "latest"})
    with pytest.raises(CheckpointMismatch, match="different base"):
        run_ppo(ru.load(rebased))

    assert ru.tree_digest(out) == before, "a refused resume changed the run folder"
    meta, state, files = checkpoint.load(checkpoint.resolve(out, "latest"))
    assert meta["policies"] == POLICIES and state["step"] == 4 and sorted(files) == sorted(POLICIES)


# ---------------------------------------------------------------------------- 6. bad inputs
def test_empty_and_long_prompts(assets, tmp_path, caplog):
    from transformers import AutoTokenizer

    from marl_ray.runtime.rollout import RolloutWorker

    long = " ".join(["the movie was great and i loved every minute of it"] * 3)
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "the movie was"}), json.dumps({"prompt": ""}), "",
                               json.dumps({"prompt": "   "}), json.dumps({"prompt": long}),
                               json.dumps({"prompt": "what a wonderful"})]) + "\n")
    w = RolloutWorker(assets["base"], str(path), 0, 1, max_prompt_tokens=8)
    with caplog.at_level(logging.WARNING, logger="marl_ray.runtime.rollout"):
        taken = w.take(3)
    # Blank lines are not rows; rows 1 and 2 ("" and spaces) are skipped and counted.
    assert [pid for pid, _ in taken] == [0, 3, 4]
    assert w.skipped_empty == 2
    full = AutoTokenizer.from_pretrained(assets["base"])(long)["input_ids"]
    assert len(full) > 8 and taken[1][1] == full[-8:]  # truncated, the end kept
    assert w.truncated == 1 and "truncated to its last 8" in caplog.text


def test_malformed_prompt_file_names_the_line(assets, tmp_path):
    from marl_ray.runtime.rollout import load_prompts
    from marl_ray.config import ConfigError
    from marl_ray.stages.ppo import run_ppo

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the movie was"}\n{"prompt": "a film"}\n{"prompt": "broken\n')
    with pytest.raises(ValueError, match="line 3"):
        load_prompts(str(path))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data\.prompts: .*line 3: not valid JSON"):
        run_ppo(ru.load(ru.run_config(assets, out, data={"prompts": str(path)})))
    assert not out.exists()  # refused before anything was written
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ConfigError, match="row 2"):
        run_ppo(ru.load(ru.run_config(assets, out, data={"prompts": str(path)})))


def test_half_written_reward_adapter_fails_before_training(assets, baseline, tmp_path):
    from marl_ray.model.adapter_io import AdapterError
    from marl_ray.config import ConfigError
    from marl_ray.model import MultiAdapterModel
    from marl_ray.stages.ppo import run_ppo

    half = tmp_path / "rm_half"
    half.mkdir()
    shutil.copy(Path(assets["reward"]) / "adapter_config.json", half)
    out = tmp_path / "run"
    shutil.copytree(baseline["out"], out)
    before = ru.tree_digest(out)
    cfg = ru.run_config(assets, out, rewards=[{"name": "rm", "path": str(half)}])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.path: .*no adapter_model\.safetensors"):
        run_ppo(ru.load(cfg))
    assert ru.tree_digest(out) == before
    # The host, reached another way (e.g. a folder that breaks after the check), says the same.
    m = MultiAdapterModel.from_pretrained(assets["base"])
    with pytest.raises(AdapterError, match="incomplete"):
        m.add_reward("rm", half)


def test_tokenizer_without_pad_token_still_trains(assets, tmp_path):
    """Nothing pads with the tokenizer: prompts are encoded one at a time; the host left-pads for
    generation with the base's generation_config.pad_token_id, or 0 when it has none (as here), and
    the learner pads prompts with 0; padding is always masked out, so any pad id works."""
    from transformers import AutoTokenizer

    from marl_ray.stages.ppo import run_ppo

    tok = AutoTokenizer.from_pretrained(assets["base"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token_id is None
    base = tmp_path / "base_nopad"
    shutil.copytree(assets["base"], base)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((base / name).read_text())
        data.pop("pad_token_id", None)
        (base / name).write_text(json.dumps(data))
    prompts = ru.write_prompts(tmp_path / "prompts.jsonl", ["", "the movie was", "a film", " ".join(ru.PROMPTS)])
    cfg = ru.run_config(assets, tmp_path / "run", model={"base": str(base), "tokenizer": str(tmp_path / "tok")},
                        data={"prompts": str(prompts), "max_prompt_tokens": 6},
                        ppo={"steps": 2, "batch_size": 2, "mini_batch_size": 1}, run={"save_every": 0})
    summary = run_ppo(ru.load(cfg))
    assert summary["steps"] == 2
    assert all(0 not in e["prompt_ids"] for e in summary["ledger"])  # the empty prompt (id 0) never used
    for p in POLICIES:
        _finite_policy_files(tmp_path / "run" / "policies", p)
        assert math.isfinite(summary["policies"][p]["objective/scores"])
