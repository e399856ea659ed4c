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
        """Drop JSONL lines of steps >= `step` (a resumed run redoes them)."""
        self.jsonl.close()
        path = self.dir / "metrics.jsonl"
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in keep))
        self.jsonl = open(path, "a")

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
