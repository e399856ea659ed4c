"""Fault injection at named points, for the tests that lose an actor on purpose.

An actor armed at a point (`arm(point, after)`) dies there, SIGKILL to its own process, on its
`after`-th next pass (0: the next one): the test names the point where the fault happens and so
proves that the recovery path it checks ran from there, whatever the timing. Points: a model host's
"sample" (a rollout's decode starts), "score" (scoring its kept rows), "allreduce" (its gradients
are computed and it is about to sum them with its peers); a rollout worker's "rollout" (before it
asks its host for samples). Nothing is armed unless a test arms it.
"""

from __future__ import annotations

import os
import signal

POINTS = ("sample", "score", "allreduce", "rollout")


class Faults:
    def __init__(self):
        self.armed: dict[str, int] = {}

    def arm(self, point: str, after: int = 0):
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
        self.armed[point] = int(after)

    def at(self, point: str):
        left = self.armed.get(point)
        if left is None:
            return
        if left > 0:
            self.armed[point] = left - 1
            return
        os.kill(os.getpid(), signal.SIGKILL)
