"""Benchmark processes that take turns, iteration by iteration (side_by_side.py --lockstep).

On a shared machine the speed drifts by 10-20% within minutes. Run one after the other, the
iterations of two implementations fall half a minute apart or more, and a pair's ratio carries
the drift. With `--turns DIR:K:N` (both ppo_step.py and trl_peer.py take it), the N processes of
a round load their models, wait for each other, then run their iterations round-robin: process
K runs an iteration only when the shared counter DIR/turn is K modulo N, and passes the turn on
after it. Iteration i of every implementation then lies within one iteration's time of the
others'. Only one process computes at a time, so none slows another down; the idle ones poll
every 5 ms (that wait is outside the timed iteration).

A process that finishes, fails or gives up marks DIR/done-K; its turns are then skipped. A
finished process waits for the others to finish before it exits (its teardown would otherwise
run beside their last iterations). A wait longer than `timeout_s` (a peer hung) stops taking
turns and runs on alone.

Standard library only: trl_peer.py imports it inside TRL's virtualenv.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


class Turns:
    def __init__(self, spec: str | None, timeout_s: float = 1800.0):
        """spec: "DIR:K:N" (process K of N, 0-based), or None/"" to never wait."""
        self.on = bool(spec)
        if not self.on:
            return
        path, k, n = spec.rsplit(":", 2)
        self.dir, self.me, self.n = Path(path), int(k), int(n)
        if not 0 <= self.me < self.n:
            raise ValueError(f"--turns {spec!r}: K must be in [0, N)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s

    def _flag(self, kind: str, k: int) -> Path:
        return self.dir / f"{kind}-{k}"

    @contextlib.contextmanager
    def _locked(self):
        with open(self.dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _turn(self) -> int:
        try:
            return int((self.dir / "turn").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _set_turn(self, t: int) -> None:
        tmp = self.dir / f"turn.{self.me}.tmp"
        tmp.write_text(str(t))
        os.replace(tmp, self.dir / "turn")

    def ready(self) -> None:
        """This process has loaded its model: the iterations start once every process has."""
        if self.on:
            self._flag("ready", self.me).touch()

    def wait(self) -> None:
        """Return when it is this process's turn (turns of finished processes are skipped)."""
        if not self.on:
            return
        t0 = time.monotonic()
        while True:
            if all(self._flag("ready", k).exists() or self._flag("done", k).exists() for k in range(self.n)):
                with self._locked():
                    t = self._turn()
                    owner = t % self.n
                    if owner == self.me:
                        return
                    if self._flag("done", owner).exists():
                        self._set_turn(t + 1)
                        continue
            if time.monotonic() - t0 > self.timeout_s:
                self._flag("done", self.me).touch()
                self.on = False
                return
            time.sleep(0.005)

    def passed(self) -> None:
        """This process's iteration is over: the next process's turn."""
        if not self.on:
            return
        with self._locked():
            t = self._turn()
            if t % self.n == self.me:
                self._set_turn(t + 1)

    def finish(self) -> None:
        """No more iterations from this process (call it in a `finally`). Returns once every process
        is done, so that no process's teardown runs beside another's last iteration."""
        if not self.on:
            return
        self._flag("done", self.me).touch()
        self.passed()
        self.on = False
        t0 = time.monotonic()
        while not all(self._flag("done", k).exists() for k in range(self.n)):
            if time.monotonic() - t0 > self.timeout_s:
                return
            time.sleep(0.005)
