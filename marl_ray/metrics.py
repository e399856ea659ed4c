"""Per-policy metrics: one JSONL line per policy per step (always), a log line, and the writers of
`run.report_to` (TRL's names): tensorboard, wandb, mlflow. Every writer gets the same scalars, named
POLICY/metric (held-out evaluations POLICY/eval/...), at the step they belong to, and the run's config
(W&B's config, MLflow's params). wandb and mlflow are imported only when asked for."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from marl_ray import console

# Shown in the one-line log summary of each policy (TRL's PPO names).
SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy", "loss/policy_avg",
           "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "perf/samples_per_s")


def _say(line: str) -> None:
    """A line on stdout above any progress bar."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _scalars(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """POLICY/metric -> value of the finite numbers of every policy."""
    return {f"{policy}/{k}": v for policy, m in metrics.items() for k, v in m.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def _flat(tree, at: str = "") -> dict[str, str]:
    """A config tree (dicts and lists) as dotted keys -> text: policies.0.lr -> '0.001'."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {at: str(tree)}
    out: dict[str, str] = {}
    for k, v in items:
        out.update(_flat(v, f"{at}.{k}" if at else str(k)))
    return out


class _TensorBoard:
    def __init__(self, out_dir: Path, run_name: str, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _WandB:
    """A Weights & Biases run: project from WANDB_PROJECT (default marl-ray), files under WANDB_DIR (default
    out_dir); WANDB_MODE=offline writes it locally only. Each process starts a run of its own."""

    def __init__(self, out_dir: Path, run_name: str, config: dict | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "marl-ray"), name=run_name,
                              dir=os.environ.get("WANDB_DIR") or str(out_dir), config=config or {},
                              reinit="create_new")

    def scalars(self, step: int, values: dict[str, float]):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class _MLflow:
    """An MLflow run in the tracking store of MLFLOW_TRACKING_URI (MLflow's default otherwise), experiment
    MLFLOW_EXPERIMENT_NAME; the config as params (dotted keys). Each process starts a run of its own."""

    _KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow takes in a metric or param name

    def __init__(self, out_dir: Path, run_name: str, config: dict | None):
        import mlflow

        self.mlflow = mlflow
        self.run_id = mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None).info.run_id
        params = {self._KEY.sub("_", k): v[:500] for k, v in _flat(config or {}).items()}
        if params:
            mlflow.log_params(params, run_id=self.run_id)

    def scalars(self, step: int, values: dict[str, float]):
        self.mlflow.log_metrics({self._KEY.sub("_", k): float(v) for k, v in values.items()}, step=step,
                                run_id=self.run_id)

    def close(self):
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self.mlflow.end_run()
        else:
            self.mlflow.MlflowClient().set_terminated(self.run_id)


WRITERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class MetricsLogger:
    """report_to: the writers besides the JSONL (RunSpec.loggers); null = tensorboard when `tensorboard`.
    config: the run's config as a plain dict, for the writers that record it (wandb, mlflow)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, echo: bool = True,
                 report_to: tuple[str, ...] | None = None, config: dict | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        if report_to is None:
            report_to = ("tensorboard",) if tensorboard else ()
        unknown = [r for r in report_to if r not in WRITERS]
        if unknown:
            raise ValueError(f"report_to: {unknown} are not among {list(WRITERS)}")
        self.writers = []
        try:
            for r in report_to:
                self.writers.append(WRITERS[r](self.dir, self.dir.name, config))
        except BaseException:
            for w in self.writers:
                w.close()
            raise
        self.jsonl = open(self.dir / "metrics.jsonl", "a")

    def truncate(self, step: int):
        """Drop JSONL lines of steps >= `step` (a resumed run redoes them), and held-out evaluations after
        `step` steps (eval.jsonl counts steps done: the one after `step` steps is redone too)."""
        self.jsonl.close()
        path = self.dir / "metrics.jsonl"
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in keep))
        self.jsonl = open(path, "a")
        for name in ("eval.jsonl", "samples.jsonl"):
            path = self.dir / name
            if path.exists():
                keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
                path.write_text("".join(ln + "\n" for ln in keep))

    def log_samples(self, step: int, rows: list[dict]):
        """Samples of a step (prompt, completion, reward, the prompt row's other fields) into samples.jsonl."""
        with open(self.dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}, default=str, ensure_ascii=False) + "\n")

    def log_eval(self, steps_done: int, metrics: dict[str, dict[str, float]]):
        """A held-out evaluation after `steps_done` steps (0 = before the first) into eval.jsonl, and the
        report_to writers (POLICY/eval/...)."""
        with open(self.dir / "eval.jsonl", "a") as f:
            for policy, m in metrics.items():
                f.write(json.dumps({"step": steps_done, "policy": policy, **m}) + "\n")
        for w in self.writers:
            w.scalars(steps_done, _scalars(metrics))
        for policy, m in metrics.items():
            if not console.quiet():  # rare and wanted: shown above the bar too
                parts = " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
                _say(f"eval after {steps_done} steps, policy {policy}: {parts}")

    def log(self, step: int, metrics: dict[str, dict[str, float]]):
        for policy, m in metrics.items():
            self.jsonl.write(json.dumps({"step": step, "policy": policy, **m}) + "\n")
            if self.echo:
                parts = " ".join(f"{k}={m[k]:.4g}" for k in SUMMARY if k in m)
                _say(f"step {step} policy {policy}: {parts}")
        self.jsonl.flush()
        for w in self.writers:
            w.scalars(step, _scalars(metrics))

    def close(self):
        self.jsonl.close()
        for w in self.writers:
            w.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
