"""The controller's short memory of what it already collects: per version and per second,
the last fifteen minutes of the gateways' signals and of its replicas, and the
autoscaler's scale events. The console, the SDK and scripts read the same numbers
through the API (``GET /v1/overview``, ``GET .../series``, with a live stream).

Once a second :meth:`TimeSeries.tick` takes every second closed since the last tick
(:func:`merlin_dp.rollout.evidence.last_countable`: the gateways' records are in) from
the signal source the autoscaler or the rollouts poll, the ready replicas from the
controller's state and the desired count from the autoscaler. Memory is bounded: at most
``window`` seconds per version, versions whose newest second left the window are
forgotten, and the autoscaler keeps a bounded list of events. Nothing is persisted: a
restarted controller starts an empty history.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from merlin_dp.autoscaler.collector import SignalSource
from merlin_dp.autoscaler.scaler import Autoscaler
from merlin_dp.common.aio import cancel_and_wait, raise_if_cancelling
from merlin_dp.controller.models import (
    ControllerState,
    ModelSeries,
    ModelSummary,
    Overview,
    ScaleEvent,
    SeriesPoint,
    VersionEndpoint,
    VersionSeries,
    VersionSummary,
)
from merlin_dp.rollout.evidence import last_countable
from merlin_dp.spec.rule import Rule
from merlin_dp.spec.signals import LATENCY_BUCKETS, SignalRecord, add_counts

WINDOW_SECONDS = 900
OVERVIEW_SECONDS = 10
TERMINAL = ("terminated",)


@dataclass(frozen=True, slots=True)
class Sample:
    """One version's second, kept: the histogram too, so rates over several seconds
    take percentiles of the whole, not of per-second percentiles."""

    second: int
    requests: int
    answered: int
    errors: int
    latency: tuple[int, ...]
    compared: int
    differed: int
    ready: int
    desired: int | None

    def point(self) -> SeriesPoint:
        return SeriesPoint(
            second=self.second, requests=self.requests, answered=self.answered,
            errors=self.errors, p50_ms=quantile_ms(self.latency, 0.5),
            p99_ms=quantile_ms(self.latency, 0.99), shadow_compared=self.compared,
            shadow_differed=self.differed, ready=self.ready, desired=self.desired,
        )  # fmt: skip


def quantile_ms(counts: Iterable[int], q: float) -> float | None:
    """The ``q`` quantile of a LATENCY_BUCKETS histogram, in milliseconds, interpolated
    within its bucket (None: no answers). The open last bucket reports its lower bound."""
    counts = list(counts)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            if i >= len(LATENCY_BUCKETS):
                return round(low * 1000, 3)
            high = LATENCY_BUCKETS[i]
            return round((low + (high - low) * (rank - seen) / n) * 1000, 3)
        seen += n
    return round(LATENCY_BUCKETS[-1] * 1000, 3)


class TimeSeries:
    def __init__(
        self,
        state: Callable[[], ControllerState],
        signals: SignalSource | None,
        scaler: Autoscaler | None,
        *,
        window: int = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.signals = signals
        self.scaler = scaler
        self.window = window
        self.clock = clock
        self._samples: dict[str, deque[Sample]] = {}  # "p/m/v" -> seconds, oldest first
        self.until = last_countable(clock())  # the newest second sampled
        self._newer = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self, interval: float = 1.0) -> None:
        async def run() -> None:
            while True:
                await self.tick()
                await asyncio.sleep(interval - self.clock() % interval)

        self._task = asyncio.create_task(run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def tick(self) -> None:
        newest = last_countable(self.clock())
        if newest <= self.until:
            return
        first = max(self.until + 1, newest - self.window + 1)
        versions = self.state().versions
        desired = self.scaler.desired if self.scaler is not None else {}
        for key, rec in versions.items():
            if rec.status in TERMINAL and key not in self._samples:
                continue
            kept = self._samples.get(key)
            if kept is None:
                kept = self._samples[key] = deque(maxlen=self.window)
            ready = len(rec.replicas) if rec.status not in TERMINAL else 0
            for second in range(first, newest + 1):
                kept.append(self._sample(key, second, ready, desired.get(key)))
        gone = newest - self.window
        for key in [k for k, kept in self._samples.items()
                    if k not in versions or (kept and kept[-1].second <= gone)]:  # fmt: skip
            del self._samples[key]
        self.until = newest
        async with self._newer:
            self._newer.notify_all()

    def _sample(self, key: str, second: int, ready: int, desired: int | None) -> Sample:
        rec: SignalRecord | None = None
        if self.signals is not None:
            project, model, version = key.split("/")
            rec = self.signals.second((project, model, version), second)
        if rec is None:
            return Sample(second, 0, 0, 0, (), 0, 0, ready, desired)
        return Sample(
            second, rec["requests"], rec.get("answered", 0), rec.get("errors", 0),
            tuple(rec.get("latency", ())), rec.get("compared", 0), rec.get("differed", 0),
            ready, desired,
        )  # fmt: skip

    async def wait_newer(self, than: int, wait_seconds: float) -> bool:
        """Until a second newer than ``than`` is sampled (False: none within
        ``wait_seconds``)."""
        async with self._newer:
            try:
                await asyncio.wait_for(
                    self._newer.wait_for(lambda: self.until > than), wait_seconds
                )
            except TimeoutError:
                raise_if_cancelling()
                return False
        return True

    # --- what the API answers ---------------------------------------------------------

    def model_series(self, project: str, model: str, since: int = -1) -> ModelSeries:
        prefix = f"{project}/{model}/"
        versions = [
            VersionSeries(version=key.removeprefix(prefix),
                          points=[s.point() for s in kept if s.second > since])
            for key, kept in sorted(self._samples.items()) if key.startswith(prefix)
        ]  # fmt: skip
        events = []
        if self.scaler is not None:
            events = [
                ScaleEvent(at=e.at, version=e.key.removeprefix(prefix),
                           from_replicas=e.from_replicas, to_replicas=e.to_replicas,
                           reason=e.reason, cold_start=e.cold_start)
                for e in self.scaler.events
                # Like the points, by the second they happened in, up to the newest
                # one closed: a stream sends each event once.
                if e.key.startswith(prefix) and since < math.floor(e.at) <= self.until
                and e.at > self.until - self.window
            ]  # fmt: skip
        return ModelSeries(
            project=project, model=model, window_seconds=self.window, until=self.until,
            signals=self.signals is not None, versions=versions, events=events,
        )  # fmt: skip

    def overview(
        self, url: Callable[[str, str, str], str], seconds: int = OVERVIEW_SECONDS
    ) -> Overview:
        """Every model with an endpoint or a version; rates over the last ``seconds``.
        ``url(project, model, protocol)`` is the model endpoint's public URL."""
        state = self.state()
        by_model: dict[tuple[str, str], list[VersionEndpoint]] = {
            (e.project, e.model): [] for e in state.endpoints.values()
        }
        for rec in state.versions.values():
            by_model.setdefault((rec.project, rec.model), []).append(rec)
        models = []
        for (project, model), records in sorted(by_model.items()):
            endpoint = state.endpoints.get(f"{project}/{model}")
            rollout = state.rollouts.get(f"{project}/{model}")
            rule = endpoint.rule if endpoint else None
            protocol = endpoint.protocol if endpoint else records[0].spec.protocol
            versions = [
                self._summary(rec, rule, seconds)
                for rec in sorted(records, key=lambda v: v.version)
            ]
            models.append(ModelSummary(
                project=project, model=model, protocol=protocol,
                url=url(project, model, protocol) if endpoint else "",
                revision=endpoint.revision if endpoint else None, rule=rule,
                rollout_phase=rollout.phase if rollout else None, versions=versions,
            ))  # fmt: skip
        return Overview(window_seconds=seconds, models=models)

    def _summary(self, rec: VersionEndpoint, rule: Rule | None, seconds: int) -> VersionSummary:
        key = f"{rec.project}/{rec.model}/{rec.version}"
        recent = [s for s in self._samples.get(key, ()) if s.second > self.until - seconds]
        answered = sum(s.answered for s in recent)
        compared = sum(s.compared for s in recent)
        latency: list[int] = []
        for s in recent:
            latency = add_counts(latency, list(s.latency))
        destinations = rule.destinations if rule else []
        weight = next((d.weight for d in destinations if d.version == rec.version), 0)
        mirror = rule.mirror if rule else None
        return VersionSummary(
            version=rec.version, status=rec.status, message=rec.message,
            ready_replicas=len(rec.replicas),
            desired_replicas=self.scaler.desired.get(key) if self.scaler is not None else None,
            weight=weight,
            mirrored_percent=mirror.percent if mirror and mirror.version == rec.version else 0.0,
            rps=round(sum(s.requests for s in recent) / seconds, 3),
            error_rate=round(sum(s.errors for s in recent) / answered, 4) if answered else None,
            p50_ms=quantile_ms(latency, 0.5), p99_ms=quantile_ms(latency, 0.99),
            shadow_agreement=(round(1 - sum(s.differed for s in recent) / compared, 4)
                              if compared else None),
        )  # fmt: skip
