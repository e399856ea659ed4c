"""`ray job submit` end to end against a real local head (CLI, loopback, token auth on).

The head is `ray start --head --block` on 127.0.0.1 with a throw-away token and private temp dir
(see runtime_utils.LocalHead); the teardown stops it by pid and checks nothing of it is left.
The job's `python` is this venv's (its bin dir leads PATH in the head's environment).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from runtime_utils import (RAY, REPO, LocalHead, free_ports, http_status, kill_procs, listening_addresses,
                           new_token_file, non_loopback, procs_with, ray_env, run_config, short_temp_dir, tiny_assets,
                           write_yaml)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("job_assets"))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = LocalHead(tmp_path_factory.mktemp("head")).start()
    try:
        yield h
    finally:
        h.stop()
        left = h.leftovers()
        assert not left, f"Ray processes of the test head still running: {[p.pid for p in left]}"


def _submit(head, workdir, job_id, *args):
    return head.cli("job", "submit", "--address", head.address, "--working-dir", str(workdir),
                    "--submission-id", job_id, "--", "python", "-m", "marl_ray", "rl", "--config", "cfg.yaml", *args)


def _logs(head, job_id) -> str:
    r = head.cli("job", "logs", "--address", head.address, job_id, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _status(head, job_id) -> str:
    r = head.cli("job", "status", "--address", head.address, job_id, timeout=60)
    return r.stdout + r.stderr


def test_head_binds_loopback_and_requires_token(head):
    procs = head.processes()
    assert len(procs) >= 4, "expected gcs, raylet, dashboard and agent processes"
    listening = listening_addresses(procs)
    assert listening, "the head listens on no TCP port?"
    assert not non_loopback(listening), f"Ray processes listening beyond loopback: {non_loopback(listening)}"
    jobs = head.address + "/api/jobs/"
    assert http_status(jobs) == 401  # no token
    assert http_status(jobs, token="0" * 64) == 403  # wrong token
    assert http_status(jobs, token=head.token) == 200
    wrong = ray_env(head.token_path, RAY_AUTH_TOKEN="0" * 64)  # RAY_AUTH_TOKEN wins over the token file
    r = head.cli("job", "list", "--address", head.address, env=wrong, timeout=60)
    assert r.returncode != 0
    assert "Invalid authentication token" in r.stdout + r.stderr


def test_job_trains_two_policies(head, assets, tmp_path):
    out = tmp_path / "out"
    wd = tmp_path / "wd"
    write_yaml(wd / "cfg.yaml", run_config(assets, out))
    r = _submit(head, wd, "ppo-ok")
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:] + "\n\n" + head.diagnosis()
    assert "Job 'ppo-ok' succeeded" in _status(head, "ppo-ok")
    logs = _logs(head, "ppo-ok")
    for step in (0, 1):
        for policy in ("up", "down"):
            assert f"step {step} policy {policy}: objective/scores=" in logs, logs[-3000:]
    assert "done: 2 steps" in logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["policy"]) for r in rows] == [(0, "up"), (0, "down"), (1, "up"), (1, "down")]
    for policy in ("up", "down"):
        assert (out / "policies" / policy / "adapter_config.json").exists()
    summary = json.loads((out / "ppo_summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["policies"]) == {"up", "down"}
    assert all(h["node_id"] for h in summary["hosts"]) and len(summary["hosts"]) == 1


def test_bad_config_jobs_fail_with_their_error_in_the_logs(head, assets, tmp_path):
    """A missing reward (in the YAML) and a nonexistent base (via --set): the job fails, `ray job submit`
    exits non-zero, the status is FAILED and the config error is in the job's logs. Both run at once."""
    cases = {
        "reward": ([], "policies[0].reward: 'nope' is not one of the rewards ['rm']"),
        "base": (["--set", "model.base=/nonexistent/marl-ray-base"], "model.base: '/nonexistent/marl-ray-base' does not exist"),
    }
    procs = {}
    for bad, (args, _) in cases.items():
        cfg = run_config(assets, tmp_path / bad / "out")
        if bad == "reward":
            cfg["policies"][0]["reward"] = "nope"
        write_yaml(tmp_path / bad / "wd" / "cfg.yaml", cfg)
        procs[bad] = subprocess.Popen(
            [RAY, "job", "submit", "--address", head.address, "--working-dir", str(tmp_path / bad / "wd"),
             "--submission-id", f"ppo-bad-{bad}", "--", "python", "-m", "marl_ray", "ppo", "--config", "cfg.yaml",
             *args], env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for bad, (_, expected) in cases.items():
        out, _ = procs[bad].communicate(timeout=300)
        assert procs[bad].returncode != 0, out[-3000:]
        job_id = f"ppo-bad-{bad}"
        assert f"Job '{job_id}' failed" in _status(head, job_id), head.diagnosis()
        logs = _logs(head, job_id)
        assert "config error" in logs and expected in logs, logs[-3000:]
        assert not (tmp_path / bad / "out").exists()  # failed before writing anything


def test_local_head_script(assets, tmp_path):
    """deployments/local_head.sh as the README runs it: head on loopback with token auth, job submitted from
    the current dir, relative config paths resolved for the local head. run.progress is left at its default
    (auto): a job's output is a log file, not a terminal, so `ray job logs` shows one line per policy for
    every step and no progress bar. KEEP_HEAD=1 keeps the head up to read the logs; the pid it prints stops
    the whole head."""
    wd = tmp_path / "wd"
    wd.mkdir()
    for name in ("base", "reward"):
        os.symlink(assets[name], wd / name)
    cfg = run_config(assets, "out")
    cfg["model"]["base"] = "base"
    cfg["rewards"][0]["path"] = "reward"
    del cfg["run"]["progress"]
    write_yaml(wd / "cfg.yaml", cfg)
    temp_dir = short_temp_dir("rjs")
    gcs, dash, client, agent = free_ports(4)
    env = ray_env(new_token_file(tmp_path), RAY_PORT=gcs, DASHBOARD_PORT=dash, RAY_CLIENT_PORT=client,
                  DASHBOARD_AGENT_PORT=agent, RAY_TEMP_DIR=temp_dir, NUM_CPUS=2, KEEP_HEAD=1,
                  SUBMISSION_ID="local-head-job")
    env.pop("PYTHONUNBUFFERED")  # the job's stdout is block-buffered, as by default: the lines are flushed
    try:
        r = subprocess.run(["bash", str(REPO / "deployments" / "local_head.sh"), "cfg.yaml", "--set", "ppo.steps=2"],
                           cwd=wd, env=env, capture_output=True, text=True, timeout=300)
        text = r.stdout + r.stderr
        assert r.returncode == 0, text[-4000:]
        assert (wd / "out" / "metrics.jsonl").exists()  # relative out_dir resolved against the submit dir
        logs = subprocess.run([RAY, "job", "logs", "--address", f"http://127.0.0.1:{dash}", "local-head-job"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert logs.returncode == 0, logs.stdout + logs.stderr
        for step in (0, 1):
            for policy in ("up", "down"):
                assert f"step {step} policy {policy}: objective/scores=" in logs.stdout, logs.stdout[-3000:]
        assert "done: 2 steps" in logs.stdout
        assert "%|" not in logs.stdout and "it/s]" not in logs.stdout  # no progress bar in a log file
        pid = int(re.search(r"head left running \(pid (\d+)", text).group(1))
        os.kill(pid, signal.SIGTERM)  # what the script says: "stop it with: kill PID"
        deadline = time.monotonic() + 60
        while procs_with(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not procs_with(temp_dir), "the head's processes outlived its pid"
    finally:
        kill_procs(procs_with(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
