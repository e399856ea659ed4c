"""Per-policy metrics: one JSONL line per policy per step, TensorBoard scalars, a log line."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Shown in the one-line log summary of each policy (TRL's PPO names).
SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy", "loss/policy_avg",
           "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "perf/samples_per_s")


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
        ev = self.dir / "eval.jsonl"
        if ev.exists():
            keep = [ln for ln in ev.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
            ev.write_text("".join(ln + "\n" for ln in keep))

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
            if self.echo:
                parts = " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
                print(f"eval after {steps_done} steps, policy {policy}: {parts}", flush=True)
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
                print(f"step {step} policy {policy}: {parts}", flush=True)
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
