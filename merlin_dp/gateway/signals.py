"""Per-version autoscaling signals, per wall-clock second (:class:`SignalRecord`).

The hot path only bumps counters it keeps anyway (``VersionStats.arrivals``, ``in_flight``,
``queued``, ``served``, ``service_seconds``). A ticker samples every version's in-flight
and queued counts every 50 ms — time-weighted means for the price of a few additions per
tick, none per request — and closes each wall-clock second into a short history. Seconds
are wall-clock so several gateways' reports line up; the autoscaler pulls them from the
admin port (``/signals``) or reads them from Redis.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from merlin_dp.gateway.metrics import VersionStats
from merlin_dp.spec.signals import SignalRecord

SAMPLE_SECONDS = 0.05
HISTORY_SECONDS = 30

Key = tuple[str, str, str]


class SignalRecorder:
    """Samples every version's counts and closes each second into ``history``."""

    def __init__(
        self,
        versions: Callable[[], Iterable[VersionStats]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._versions = versions
        self._clock = clock
        self._second = math.floor(clock())
        # key -> [sum of in flight, sum of queued, samples] over the open second
        self._samples: dict[Key, list[float]] = {}
        # key -> (arrivals, served, service_seconds) when the last second closed
        self._totals: dict[Key, tuple[int, int, float]] = {}
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
                acc = self._samples[key] = [0.0, 0.0, 0.0]
            acc[0] += vs.in_flight
            acc[1] += vs.queued
            acc[2] += 1

    def _close(self, second: int) -> None:
        for vs in self._versions():
            key = (vs.project, vs.model, vs.version)
            acc = self._samples.get(key)
            if acc is None or not acc[2]:
                acc = [float(vs.in_flight), float(vs.queued), 1.0]
            arrivals, served, busy = self._totals.get(key, (0, 0, 0.0))
            self._totals[key] = (vs.arrivals, vs.served, vs.service_seconds)
            requests = vs.arrivals - arrivals
            completions = vs.served - served
            concurrency = acc[0] / acc[2]
            queued = acc[1] / acc[2]
            if requests or completions or concurrency:
                self.history.append({
                    "project": vs.project, "model": vs.model, "version": vs.version,
                    "second": second, "requests": requests, "concurrency": concurrency,
                    # In flight but not queued: on a replica (or its body still arriving).
                    "in_service": max(0.0, concurrency - queued), "queued": queued,
                    "completions": completions,
                    "service_seconds": vs.service_seconds - busy,
                })  # fmt: skip
        self._samples.clear()

    def since(self, second: int) -> list[SignalRecord]:
        return [r for r in self.history if r["second"] > second]
