"""Per-version autoscaling signals, per wall-clock second (:class:`SignalRecord`).

The hot path only bumps counters it keeps anyway (``VersionStats.arrivals``, ``in_flight``,
``queued``, ``served``, ``service_seconds``). A ticker samples every version's in-flight
and queued counts every 50 ms — time-weighted means for the price of a few additions per
tick, none per request — and closes each wall-clock second into a short history. Seconds
are wall-clock so several gateways' reports line up; the autoscaler pulls them from the
admin port (``/signals``) or reads them from Redis.

What a rollout is judged on comes from the metrics' own histograms and mirror counters,
as differences between one second's totals and the last's: nothing more on the hot path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from merlin_dp.gateway.metrics import MirrorStats, VersionStats
from merlin_dp.spec.signals import GRPC_SERVER_FAULTS, SignalRecord

SAMPLE_SECONDS = 0.05
HISTORY_SECONDS = 30

Key = tuple[str, str, str]
Shadow = dict[str, int | list[int]]  # a record's shadow_* and compared/differed fields
# Not answers: the client left (HTTP 499 as nginx logs it, gRPC CANCELLED).
CLIENT_GONE = 499
GRPC_CANCELLED = 1


class Answers:
    """Running totals of one version's answers (or one mirror target's copies): how
    many, how many were server errors, and per latency bucket."""

    __slots__ = ("answered", "errors", "latency")

    def __init__(
        self, answered: int = 0, errors: int = 0, latency: list[int] | None = None
    ) -> None:
        self.answered = answered
        self.errors = errors
        self.latency = latency or []

    def since(self, before: Answers | None) -> tuple[int, int, list[int]]:
        if before is None:
            return self.answered, self.errors, list(self.latency)
        old = before.latency
        latency = [n - (old[i] if i < len(old) else 0) for i, n in enumerate(self.latency)]
        return self.answered - before.answered, self.errors - before.errors, latency


def answers(vs: VersionStats) -> Answers:
    total = Answers()
    for by_code in vs.by_choice:
        for code, cs in by_code.items():
            if code != CLIENT_GONE:
                _add(total, cs.count, cs.buckets, code >= 500)
    for by_code in vs.grpc_by_choice:
        for code, cs in by_code.items():
            if code != GRPC_CANCELLED:
                _add(total, cs.count, cs.buckets, code in GRPC_SERVER_FAULTS)
    return total


def copies(ms: MirrorStats) -> tuple[Answers, int, int]:
    """A mirror target's copies that ended (answered, or sent and failed: no answer is a
    server error too), and its compared pairs without a server error and those that
    differed."""
    failed = sum(n for key, n in ms.results.items()
                 if key.startswith("error|") and key != "error|no_replica")  # fmt: skip
    total = Answers(failed, failed + ms.server_errors, list(ms.latency.buckets))
    total.answered += ms.latency.count
    return total, ms.compared - ms.error_pairs, ms.differed


def _add(total: Answers, count: int, buckets: list[int], error: bool) -> None:
    total.answered += count
    if error:
        total.errors += count
    latency = total.latency
    if not latency:
        total.latency = list(buckets)
    else:
        for i, n in enumerate(buckets):
            latency[i] += n


class SignalRecorder:
    """Samples every version's counts and closes each second into ``history``."""

    def __init__(
        self,
        versions: Callable[[], Iterable[VersionStats]],
        mirrors: Callable[[], Iterable[MirrorStats]] = tuple,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._versions = versions
        self._mirrors = mirrors
        self._clock = clock
        self._second = math.floor(clock())
        # key -> [sum of in flight, sum of queued, samples] over the open second
        self._samples: dict[Key, list[float]] = {}
        # key -> (arrivals, served, service_seconds) when the last second closed
        self._totals: dict[Key, tuple[int, int, float]] = {}
        # key -> answers, mirrored copies (and compared, differed) when it closed
        self._answers: dict[Key, Answers] = {}
        self._copies: dict[Key, tuple[Answers, int, int]] = {}
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
        shadows: dict[Key, Shadow] = {}
        for ms in self._mirrors():
            key = (ms.project, ms.model, ms.version)
            now = copies(ms)
            before = self._copies.get(key)
            self._copies[key] = now
            answered, errors, latency = now[0].since(before[0] if before else None)
            compared = now[1] - (before[1] if before else 0)
            if answered or compared:
                shadows[key] = {
                    "shadow_answered": answered, "shadow_errors": errors,
                    "shadow_latency": latency, "compared": compared,
                    "differed": now[2] - (before[2] if before else 0),
                }  # fmt: skip
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
            total = answers(vs)
            answered, errors, latency = total.since(self._answers.get(key))
            self._answers[key] = total
            shadow = shadows.pop(key, None)
            if requests or completions or concurrency or answered or shadow:
                record: SignalRecord = {
                    "project": vs.project, "model": vs.model, "version": vs.version,
                    "second": second, "requests": requests, "concurrency": concurrency,
                    # In flight but not queued: on a replica (or its body still arriving).
                    "in_service": max(0.0, concurrency - queued), "queued": queued,
                    "completions": completions,
                    "service_seconds": vs.service_seconds - busy,
                }  # fmt: skip
                if answered:
                    record["answered"] = answered
                    record["errors"] = errors
                    record["latency"] = latency
                if shadow:
                    record.update(shadow)  # type: ignore[typeddict-item]
                self.history.append(record)
        for (project, model, version), shadow in shadows.items():
            # A version only mirrored to has served no caller: its copies alone.
            self.history.append({
                "project": project, "model": model, "version": version, "second": second,
                "requests": 0, "concurrency": 0.0, "in_service": 0.0, "queued": 0.0,
                "completions": 0, "service_seconds": 0.0, **shadow,  # type: ignore[typeddict-item]
            })  # fmt: skip
        self._samples.clear()

    def since(self, second: int) -> list[SignalRecord]:
        return [r for r in self.history if r["second"] > second]
