"""Serving before training on shared devices (issue 12, "Predict isolation").

A search and Predict calls run on the same devices. Without a rule, a
Predict that arrives while a search trains waits behind whatever training
work is queued on the device and shares the cores with it. The rule here:

- the training loop keeps at most two steps of each candidate in flight
  (it waits on step k-1 once step k is dispatched), so a Predict never
  queues behind a long backlog;
- before dispatching a step it yields to serving: while a Predict is in
  flight, or one ended less than `quiet_seconds` ago (a client sending calls
  back to back), it waits, but never longer than `max_wait_seconds` per step,
  so a search under continuous Predict traffic slows down and never stops.

A Predict then shares the devices with at most the one training step that
was already running when it arrived.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Iterator

from evolve.config import SERVING_MAX_YIELD_SECONDS


class ServingPriority:
    """Counts Predict calls in flight; training waits on it between steps."""

    def __init__(self, quiet_seconds: float = 0.002, max_wait_seconds: float = SERVING_MAX_YIELD_SECONDS):
        if quiet_seconds < 0 or max_wait_seconds < 0:
            raise ValueError("quiet_seconds and max_wait_seconds must be >= 0")
        self.quiet_seconds = quiet_seconds
        self.max_wait_seconds = max_wait_seconds  # 0: training never waits
        self._condition = threading.Condition()
        self._in_flight = 0
        self._last_end = -math.inf
        self.yields = 0  # steps that waited

    @property
    def enabled(self) -> bool:
        return self.max_wait_seconds > 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Marks one Predict call in flight for its duration."""
        with self._condition:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._condition:
                self._in_flight -= 1
                self._last_end = time.monotonic()
                self._condition.notify_all()

    def in_flight(self) -> int:
        with self._condition:
            return self._in_flight

    def yield_to_serving(self) -> float:
        """Waits while serving is busy (bounded); returns the seconds waited."""
        if not self.enabled:
            return 0.0
        started = time.monotonic()
        deadline = started + self.max_wait_seconds
        waited = False
        with self._condition:
            while True:
                quiet_at = deadline if self._in_flight else self._last_end + self.quiet_seconds
                remaining = min(quiet_at, deadline) - time.monotonic()
                if remaining <= 0:
                    break
                waited = True
                self._condition.wait(remaining)
            if not waited:
                return 0.0
            self.yields += 1
            return time.monotonic() - started


NO_PRIORITY = ServingPriority(max_wait_seconds=0.0)
