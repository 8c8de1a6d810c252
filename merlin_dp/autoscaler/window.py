"""Per-second buckets and the windowed averages policies read.

Signals arrive as per-second values (a gateway's request count and time-weighted mean
concurrency for one second, summed over gateways). :class:`SecondBuckets` keeps them
for the longest window; :meth:`SecondBuckets.average` is the mean over the last N seconds,
where a second with no report counts as zero (Knative's behaviour: silence is idleness) —
but :meth:`SecondBuckets.fresh` tells the caller whether anything arrived recently, so a
collector that lost its sources can hold rather than scale to zero. Time is passed in.
"""

from __future__ import annotations

import math


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

    def average(self, now: float, window_s: float) -> float:
        """Mean per-second value over the complete seconds of the last ``window_s``."""
        end = math.floor(now)  # the current second is still filling
        n = max(1, math.ceil(window_s))
        return sum(self._values.get(s, 0.0) for s in range(end - n, end)) / n

    def fresh(self, now: float, within_s: float) -> bool:
        return self._last_report is not None and now - self._last_report <= within_s
