"""Per-second buckets and the windowed sums and averages policies read.

Signals arrive as per-second records (:class:`~merlin_dp.spec.signals.SignalRecord`,
summed over gateways). :class:`SecondBuckets` keeps one number per second for a horizon;
:meth:`SecondBuckets.average` is the mean over the last N complete seconds, where a second
with no report counts as zero (Knative's behaviour: silence is idleness) — but
:meth:`SecondBuckets.fresh` tells the caller whether anything arrived recently, so a
collector that lost its sources can hold rather than scale to zero.
:class:`VersionSeries` is one version's buckets, a record's fields each, and arrivals per
minute for two days (daily cycles). Time is passed in.
"""

from __future__ import annotations

import math

from merlin_dp.spec.signals import SUMMED, SignalRecord

# How far back arrivals are kept, for the forecast to find periodic load in (an hour:
# batch callers every few minutes, seen several times over).
ARRIVALS_HORIZON_S = 3600
# Arrivals per minute are kept two days, for daily cycles.
MINUTES_HORIZON = 2 * 24 * 60
# The other fields: the longest window a policy reads, with room to spare.
HORIZON_S = 180


class SecondBuckets:
    def __init__(self, horizon_s: int) -> None:
        self.horizon = horizon_s
        self._values: dict[int, float] = {}
        self._last_report: float | None = None

    def add(self, second: int, value: float, now: float) -> None:
        """Add ``value`` to the bucket of ``second`` (several gateways add to one)."""
        self._values[second] = self._values.get(second, 0.0) + value
        self._last_report = now
        cutoff = second - self.horizon
        if len(self._values) > self.horizon * 2:
            for key in [k for k in self._values if k < cutoff]:
                del self._values[key]

    def total(self, now: float, window_s: float) -> float:
        """Sum over the complete seconds of the last ``window_s``."""
        end = math.floor(now)  # the current second is still filling
        n = max(1, math.ceil(window_s))
        values = self._values
        return sum(values.get(s, 0.0) for s in range(end - n, end))

    def average(self, now: float, window_s: float) -> float:
        """Mean per-second value over the complete seconds of the last ``window_s``."""
        return self.total(now, window_s) / max(1, math.ceil(window_s))

    def last(self, now: float) -> float:
        """The last complete second's value; the one before when the last has not been
        reported yet (a gateway closes a second when its ticker passes it, and a poll
        may come first), 0 when neither was."""
        end = math.floor(now)
        value = self._values.get(end - 1)
        return value if value is not None else self._values.get(end - 2, 0.0)

    def series(self, now: float, seconds: int) -> list[float]:
        """The last ``seconds`` complete seconds' values, oldest first."""
        end = math.floor(now)
        values = self._values
        return [values.get(s, 0.0) for s in range(end - seconds, end)]

    def fresh(self, now: float, within_s: float) -> bool:
        return self._last_report is not None and now - self._last_report <= within_s


class VersionSeries:
    """One version endpoint's signals, a :class:`SecondBuckets` per record field."""

    __slots__ = ("completions", "concurrency", "in_service", "queued", "requests",
                 "requests_by_minute", "service_seconds")  # fmt: skip

    def __init__(self, horizon_s: int = HORIZON_S) -> None:
        self.requests = SecondBuckets(max(horizon_s, ARRIVALS_HORIZON_S))
        # Keyed by minute (second // 60): the same class, a coarser clock.
        self.requests_by_minute = SecondBuckets(MINUTES_HORIZON)
        self.concurrency = SecondBuckets(horizon_s)
        self.in_service = SecondBuckets(horizon_s)
        self.queued = SecondBuckets(horizon_s)
        self.completions = SecondBuckets(horizon_s)
        self.service_seconds = SecondBuckets(horizon_s)

    def add(self, record: SignalRecord, now: float) -> None:
        second = record["second"]
        self.requests_by_minute.add(second // 60, float(record["requests"]), now)
        for name in SUMMED:
            value = record.get(name)
            if value is not None:
                bucket: SecondBuckets = getattr(self, name)
                bucket.add(second, float(value), now)  # type: ignore[arg-type]
