"""run.report_to: where metrics go besides metrics.jsonl (TRL's names): tensorboard, wandb, mlflow, none.

W&B runs offline (WANDB_MODE=offline, its files under tmp_path) and its run file is read back record by
record; MLflow writes to a local file store (file://tmp_path/mlruns) read back with MLflow's client.
Nothing leaves the machine.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

import reliability_utils as ru
from marl_ray.config import ConfigError
from marl_ray.metrics import MetricsLogger, read_metrics

FAKE = {"base": "b", "reward": "r", "prompts": "p.jsonl"}
STEPS = {0: {"up": {"objective/kl": 0.5, "lr": 1e-3, "bad": float("nan")}, "down": {"objective/kl": -0.25}},
         1: {"up": {"objective/kl": 0.75, "lr": 2e-3}, "down": {"objective/kl": -0.5}}}
EVAL = {"up": {"eval/reward": 1.5}, "down": {"eval/reward": -1.5}}
CONFIG = {"policies": [{"name": "up", "lr": 0.001}], "ppo": {"steps": 2}}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow on a file store, everything under tmp_path; no telemetry."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb_dir", "WANDB_SILENT": "true",
                 "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                 "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_PROJECT": "report-to-test",
                 "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
                 "MLFLOW_EXPERIMENT_NAME": "report-to-test", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "DO_NOT_TRACK": "true"}.items():
        monkeypatch.setenv(k, str(v))
    (tmp_path / "wandb_dir").mkdir()
    yield tmp_path
    import wandb

    wandb.teardown()  # stops the W&B service process this test started


# ---------------------------------------------------------------------------- reading the runs back
def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (.wandb): a 7-byte header (':W&B', 0xBEE1, version 0), then blocks of
    32 KiB holding records (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last part), each a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B" and data[4:7] == b"\xe1\xbe\x00", data[:7]
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def wandb_run(root: Path) -> tuple[dict[int, dict], dict]:
    """(step -> the scalars logged at it, the run's config) of the one offline run under `root`."""
    import wandb

    wandb.teardown()  # the W&B service has written out everything it was sent
    files = list(root.glob("**/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history: dict[int, dict] = {}
    config = {}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items.pop("_step")), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif kind in ("run", "config"):  # the config given to wandb.init is in the run record
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items if not i.key.startswith("_")})
    return history, config


def mlflow_run(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("report-to-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    return client, run


# ---------------------------------------------------------------------------- config
def test_report_to_defaults_to_tensorboard_and_takes_one_name_or_a_list(tmp_path):
    assert ru.load(ru.run_config(FAKE, tmp_path)).run.loggers == ()  # the helper's tensorboard: false
    run = {"out_dir": str(tmp_path), "progress": False, "tensorboard": True}
    cfg = ru.run_config(FAKE, tmp_path)
    cfg["run"] = {"out_dir": str(tmp_path)}  # nothing said: the default
    assert ru.load(cfg).run.report_to == ("tensorboard",) and ru.load(cfg).run.loggers == ("tensorboard",)
    cfg = ru.load(ru.run_config(FAKE, tmp_path, run={**run, "report_to": "wandb"}))
    assert cfg.run.report_to == ("wandb",) and cfg.run.loggers == ("wandb",)
    cfg = ru.load(ru.run_config(FAKE, tmp_path, run={**run, "report_to": ["tensorboard", "mlflow"],
                                                     "tensorboard": False}))
    assert cfg.run.loggers == ("mlflow",)
    assert ru.load(ru.run_config(FAKE, tmp_path, run={**run, "report_to": "none"})).run.loggers == ()


@pytest.mark.parametrize("report_to, words", [
    (["tensorboard", "comet_ml"], "'comet_ml' is not one of tensorboard, wandb, mlflow, none"),
    (["none", "wandb"], "none means no logger; give it alone"),
])
def test_bad_report_to_is_a_config_error(tmp_path, report_to, words):
    with pytest.raises(ConfigError) as e:
        ru.load(ru.run_config(FAKE, tmp_path, run={"report_to": report_to}))
    assert str(e.value).startswith("run.report_to: ") and words in str(e.value), str(e.value)


@pytest.mark.parametrize("module, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_logger_that_is_not_installed_is_refused_naming_the_pip_package(tmp_path, monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: `import` fails
    with pytest.raises(ConfigError) as e:
        ru.load(ru.run_config(FAKE, tmp_path, run={"report_to": ["tensorboard", module]}))
    assert str(e.value) == (f"run.report_to: {module} is not installed in this environment: pip install {package} "
                            f"(or leave {module} out)")


# ---------------------------------------------------------------------------- the writers
def _log(out: Path, report_to):
    logger = MetricsLogger(out, echo=False, report_to=report_to, config=CONFIG)
    logger.log_eval(0, EVAL)
    for step, m in STEPS.items():
        logger.log(step, m)
    logger.log_eval(2, EVAL)
    logger.close()


def test_wandb_offline_gets_every_policy_scalar_the_evals_and_the_config(offline):
    _log(offline / "out", ("wandb",))
    history, config = wandb_run(offline / "wandb_dir")
    assert history == {0: {"up/eval/reward": 1.5, "down/eval/reward": -1.5, "up/objective/kl": 0.5, "up/lr": 1e-3,
                           "down/objective/kl": -0.25},
                       1: {"up/objective/kl": 0.75, "up/lr": 2e-3, "down/objective/kl": -0.5},
                       2: {"up/eval/reward": 1.5, "down/eval/reward": -1.5}}
    assert config == CONFIG
    assert len(read_metrics(offline / "out" / "metrics.jsonl")) == 4  # the JSONL is written as always
    assert not (offline / "out" / "tensorboard").exists()


def test_mlflow_file_store_gets_every_policy_scalar_the_evals_and_the_config_as_params(offline):
    _log(offline / "out", ("mlflow",))
    client, run = mlflow_run(offline)
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert run.data.params == {"policies.0.name": "up", "policies.0.lr": "0.001", "ppo.steps": "2"}

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                   key=lambda m: m.step)]

    assert history("up/objective/kl") == [(0, 0.5), (1, 0.75)] and history("down/objective/kl") == [(0, -0.25),
                                                                                                  (1, -0.5)]
    assert history("up/lr") == [(0, 1e-3), (1, 2e-3)] and history("down/eval/reward") == [(0, -1.5), (2, -1.5)]
    assert "up/bad" not in run.data.metrics  # a NaN is left out, as in TensorBoard


def test_a_run_reports_to_tensorboard_wandb_and_mlflow_at_once(offline):
    """A real (tiny, in-process) run: each backend gets each step's scalars of both policies, lr included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from marl_ray.stages.ppo import run_ppo

    assets = ru.build_assets(offline / "assets")
    out = offline / "run"
    run_ppo(ru.load(ru.run_config(assets, out, ppo={"steps": 2},
                                  run={"save_every": 0, "report_to": ["tensorboard", "wandb", "mlflow"],
                                       "tensorboard": True})))
    jsonl = ru.metrics_by_step(out)
    history, config = wandb_run(offline / "wandb_dir")
    client, run = mlflow_run(offline)
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    for (step, policy), m in jsonl.items():
        for key in ("objective/scores", "loss/policy_avg", "lr"):
            assert history[step][f"{policy}/{key}"] == pytest.approx(m[key], rel=1e-6)
            got = {x.step: x.value for x in client.get_metric_history(run.info.run_id, f"{policy}/{key}")}
            assert got[step] == pytest.approx(m[key], rel=1e-6)
            assert {e.step: e.value for e in tb.Scalars(f"{policy}/{key}")}[step] == pytest.approx(m[key], rel=1e-5)
    assert config["ppo"]["steps"] == 2 and config["policies"][1]["name"] == "down"
    assert run.data.params["ppo.steps"] == "2" and run.data.params["policies.1.name"] == "down"
    assert run.data.params["run.report_to.1"] == "wandb"
