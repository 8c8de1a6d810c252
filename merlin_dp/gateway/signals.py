"""Per-version autoscaling signals, per wall-clock second: arrivals and mean concurrency.

The hot path only bumps ``VersionStats.arrivals`` and ``in_flight`` (it did the latter
already). A ticker samples every version's ``in_flight`` every 50 ms — a time-weighted
mean for the price of a few additions per tick, none per request — and closes each
wall-clock second into a short history. Seconds are wall-clock so several gateways'
reports line up; the autoscaler pulls them from the admin port (``/signals``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypedDict

from merlin_dp.gateway.metrics import VersionStats

SAMPLE_SECONDS = 0.05
HISTORY_SECONDS = 30


class SignalRecord(TypedDict):
    """One version endpoint's closed second, as ``/signals`` and the Redis stream carry it
    (the autoscaler reads these keys)."""

    project: str
    model: str
    version: str
    second: int  # wall-clock, whole seconds since the epoch
    requests: int  # arrivals within the second
    concurrency: float  # mean requests in flight over the second


class SignalRecorder:
    """Samples every version's in-flight count and closes each second into ``history``."""

    def __init__(
        self,
        versions: Callable[[], Iterable[VersionStats]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._versions = versions
        self._clock = clock
        self._second = math.floor(clock())
        self._samples: dict[tuple[str, str, str], list[float]] = {}  # key -> [sum, n]
        self._arrivals: dict[tuple[str, str, str], int] = {}
        self.history: deque[SignalRecord] = deque(maxlen=HISTORY_SECONDS * 64)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(SAMPLE_SECONDS, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.sample()
        self._handle = asyncio.get_running_loop().call_later(SAMPLE_SECONDS, self._tick)

    def sample(self) -> None:
        now = self._clock()
        second = math.floor(now)
        if second != self._second:
            self._close(self._second)
            self._second = second
        for vs in self._versions():
            key = (vs.project, vs.model, vs.version)
            acc = self._samples.get(key)
            if acc is None:
                acc = self._samples[key] = [0.0, 0.0]
            acc[0] += vs.in_flight
            acc[1] += 1

    def _close(self, second: int) -> None:
        for vs in self._versions():
            key = (vs.project, vs.model, vs.version)
            acc = self._samples.get(key, [0.0, 0.0])
            before = self._arrivals.get(key, 0)
            self._arrivals[key] = vs.arrivals
            requests = vs.arrivals - before
            concurrency = acc[0] / acc[1] if acc[1] else float(vs.in_flight)
            if requests or concurrency:
                self.history.append({"project": vs.project, "model": vs.model,
                                     "version": vs.version, "second": second,
                                     "requests": requests, "concurrency": concurrency})  # fmt: skip
        self._samples.clear()

    def since(self, second: int) -> list[SignalRecord]:
        return [r for r in self.history if r["second"] > second]
