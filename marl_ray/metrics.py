"""Per-policy metrics: one JSONL line per policy per step, TensorBoard scalars, a log line."""

from __future__ import annotations

import json
import math
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


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, echo: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.echo = echo
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

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
        """A held-out evaluation after `steps_done` steps (0 = before the first) into eval.jsonl, and
        TensorBoard (POLICY/eval/...)."""
        with open(self.dir / "eval.jsonl", "a") as f:
            for policy, m in metrics.items():
                f.write(json.dumps({"step": steps_done, "policy": policy, **m}) + "\n")
        for policy, m in metrics.items():
            if self.tb is not None:
                for k, v in m.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"{policy}/{k}", v, steps_done)
            if not console.quiet():  # rare and wanted: shown above the bar too
                parts = " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
                _say(f"eval after {steps_done} steps, policy {policy}: {parts}")
        if self.tb is not None:
            self.tb.flush()

    def log(self, step: int, metrics: dict[str, dict[str, float]]):
        for policy, m in metrics.items():
            self.jsonl.write(json.dumps({"step": step, "policy": policy, **m}) + "\n")
            if self.tb is not None:
                for k, v in m.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"{policy}/{k}", v, step)
            if self.echo:
                parts = " ".join(f"{k}={m[k]:.4g}" for k in SUMMARY if k in m)
                _say(f"step {step} policy {policy}: {parts}")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
