"""Checkpoints written where the state is (`run.storage`): the hosts write their policies' folders, the
driver its own files and meta.json last; `resume` reads from the same place; the trained policies are
exported there too. A local path in-process, and a real S3 API on loopback (moto's standalone server,
started and stopped by this test by its pid) with two Ray hosts, where a run that loses every host
goes back to the checkpoint in S3 and still reproduces the uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reliability_utils as ru

POLICIES = ("up", "down")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ru.build_assets(tmp_path_factory.mktemp("storage_assets"))


def _run(assets, out, storage, **sections):
    from marl_ray.stages.ppo import run_ppo

    run = {"storage": str(storage), "save_every": 2, **sections.pop("run", {})}
    return run_ppo(ru.load(ru.run_config(assets, out, run=run, **sections)))


def test_hosts_write_checkpoints_to_a_path_and_resume_reads_them(assets, tmp_path):
    from marl_ray.storage import Storage
    from marl_ray.train import checkpoint

    store = tmp_path / "shared"
    want = _run(assets, tmp_path / "want", tmp_path / "shared-want")
    # steps 1-2, then a fresh process resumes from the storage's latest checkpoint for steps 3-4
    _run(assets, tmp_path / "run", store, ppo={"steps": 2})
    s = Storage(str(store))
    assert checkpoint.list_stored(s) == ["checkpoints/step-000002"]
    meta = json.loads((store / "checkpoints" / "step-000002" / "meta.json").read_text())
    assert set(meta["files"]) >= {"state.pt", "config.yaml", "policies/up/adapter_model.safetensors",
                                  "policies/down/optimizer.pt"}
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing of a checkpoint in out_dir"
    # a checkpoint cut off before its meta.json is never listed, and the next save removes it
    (store / "checkpoints" / "step-000003" / "policies" / "up").mkdir(parents=True)
    (store / "checkpoints" / "step-000003" / "policies" / "up" / "adapter_model.safetensors").write_bytes(b"x")
    assert checkpoint.list_stored(s) == ["checkpoints/step-000002"]
    got = _run(assets, tmp_path / "run", store, ppo={"steps": 4}, run={"resume": "latest"})
    assert checkpoint.list_stored(s) == ["checkpoints/step-000002", "checkpoints/step-000004"]
    assert not (store / "checkpoints" / "step-000003").exists()
    assert got["saved"] == {p: f"{store}/policies/{p}" for p in POLICIES}
    assert got["ledger"] == want["ledger"] and got["checksums"] == want["checksums"]
    ru.assert_same_policies(store / "policies", tmp_path / "shared-want" / "policies", POLICIES)
    full = ru.metrics_by_step(tmp_path / "want")
    ru.assert_same_metrics({k: v for k, v in ru.metrics_by_step(tmp_path / "run").items() if k[0] >= 2},
                           {k: v for k, v in full.items() if k[0] >= 2})


def test_a_storage_that_cannot_be_opened_is_refused_before_any_actor(assets, tmp_path):
    from marl_ray.config import ConfigError

    with pytest.raises(ConfigError, match="run.storage"):
        _run(assets, tmp_path / "out", "nosuchscheme://bucket/x")


# ---------------------------------------------------------------------------- a real S3 API on loopback
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 (its own process, stopped by pid); yields a storage URI."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.2)
        for k, v in {"AWS_ACCESS_KEY_ID": "marl", "AWS_SECRET_ACCESS_KEY": "marl-secret",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)  # before Ray starts: the hosts inherit them
        yield (f"s3://marl-runs/exp1?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
               "&allow_bucket_creation=true")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_ray_hosts_write_checkpoints_to_s3_and_a_run_that_loses_every_host_goes_back_to_it(
        assets, tmp_path, s3, caplog):
    """Two hosts on one node write their policies to S3 (one policy each) and the driver meta.json last.
    After step 2's checkpoint both hosts are killed: no host holds step 2's start, so the run goes back
    to the checkpoint in S3 (each host reading its policies from S3) and reproduces the uninterrupted
    run's metrics, ledger and policies."""
    import logging
    import signal

    from marl_ray.runtime.handles import get
    from marl_ray.stages.ppo import run_ppo
    from marl_ray.storage import Storage
    from marl_ray.train import checkpoint

    cluster = {"runtime": "ray", "num_hosts": 2, "hosts_per_node": 2, "max_restarts": 2}
    with ru.private_local_ray(num_cpus=2):
        want = run_ppo(ru.load(ru.run_config(assets, tmp_path / "want", cluster=cluster, run={"save_every": 2})))
        seen = {}

        def on_step(step, metrics):
            if step == 2 and "killed" not in seen:  # after step 2's checkpoint, within step 3's start
                for h in seen["learner"].hosts.hosts:
                    os.kill(get(h.pid.remote()), signal.SIGKILL)
                seen["killed"] = True

        cfg = ru.load(ru.run_config(assets, tmp_path / "run", cluster=cluster,
                                    run={"save_every": 2, "storage": s3}))
        with caplog.at_level(logging.WARNING, logger="marl_ray.train"):
            got = run_ppo(cfg, on_start=lambda learner: seen.update(learner=learner), on_step=on_step)
    assert seen.get("killed")
    assert "no host holds the state of step 3" in caplog.text and "step-000002, step 2" in caplog.text, caplog.text
    store = Storage(s3)
    assert checkpoint.list_stored(store) == ["checkpoints/step-000002", "checkpoints/step-000004"]
    assert sorted(store.listdir("policies")) == sorted(POLICIES)
    assert got["ledger"] == want["ledger"] and got["checksums"] == want["checksums"]
    ru.assert_same_metrics(ru.metrics_by_step(tmp_path / "run"), ru.metrics_by_step(tmp_path / "want"))
    assert got["saved"]["up"].startswith("s3://marl-runs/exp1/policies/up")
