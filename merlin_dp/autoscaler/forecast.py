"""Load that can be seen coming: periodic arrivals, found in the history the autoscaler
keeps, and the arrival rate they predict one start-up time ahead.

Pure functions of an arrival series (oldest first, ending with the last complete second,
or minute: the unit is the series'); nothing here reads a clock. :func:`find_period`
looks for the lag at which the load best resembles itself (the autocorrelation of coarse
bins, refined to the unit); :func:`predict` takes the median of what arrived one, two and
three periods before each unit of the next ``lead``. The policy
(:mod:`merlin_dp.autoscaler.policy`) decides whether to trust it.

A period is known to a unit, no better: a burst whose edges fall across a second boundary
differently each time (a caller's jitter, a loaded machine) reads as 11 s one time and
13 s the next. Over a burst a few seconds wide, copies a unit out of phase disagree at
its edges, and the lower of two is then its edge, not its height: the order comes late.
So :func:`predict` gives a bound. The ``"upper"`` one, what to order for, takes each
earlier period's most over its phase and the unit after it (a period read a unit long
puts the burst a unit later in the copy; read short, the copy shows it early anyway).
The ``"lower"`` one, what must have come for the forecast to have held, takes the least
over the phase and a unit either side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MIN_PERIOD_S = 40  # shorter cycles are the reactive windows' job (PolicyConfig's default)
MIN_STRENGTH = 0.6  # correlation of the load with itself one period earlier
MAX_PERIODS = 3  # periods averaged into a prediction
SMOOTH_S = 3  # a prediction is the mean of this many seconds around the same phase

Bound = Literal["upper", "lower"]


@dataclass(frozen=True, slots=True)
class Period:
    seconds: int  # 0: no periodic load found
    strength: float  # its correlation, -1..1


NO_PERIOD = Period(0, 0.0)


def find_period(arrivals: Sequence[float], min_period: int = MIN_PERIOD_S) -> Period:
    """The period of ``arrivals`` (requests per second), at least ``min_period`` seconds,
    when the history holds one and a half periods of it and one period resembles the
    next; else :data:`NO_PERIOD`. The search runs on bins of a quarter of ``min_period``,
    then to the second around the best."""
    bin_s = max(1, min_period // 4)
    n = len(arrivals) // bin_s
    if n < 2 * (min_period // bin_s):
        return NO_PERIOD
    offset = len(arrivals) - n * bin_s
    counts = [sum(arrivals[offset + i * bin_s : offset + (i + 1) * bin_s]) for i in range(n)]
    mean = sum(counts) / n
    # A trend resembles itself at every lag: correlate what is left around it.
    bins = _detrended(counts)
    if mean <= 0 or sum(b * b for b in bins) / n <= 4 * mean:
        # Counts vary around the trend no more than a Poisson process's would (variance =
        # mean): whatever correlation there is, is noise.
        return NO_PERIOD
    # Lags up to two thirds of the history: the overlap then holds the pattern twice (at
    # least half a period of it aligned with the same half one period later).
    scores = {
        lag: _correlation(bins, lag) if _both_swing(bins, lag) else -1.0
        for lag in range(min_period // bin_s, 2 * n // 3 + 1)
    }
    best = max(scores.values())
    if best < MIN_STRENGTH:
        return NO_PERIOD
    # The shortest lag nearly as good as the best: a cycle also repeats at twice its period.
    coarse = min(lag for lag, score in scores.items() if score >= best - 0.05)
    while scores.get(coarse + 1, -2.0) >= scores[coarse]:
        coarse += 1  # to the top of that peak: a smooth cycle's rises to it gradually
    lo = max(min_period, (coarse - 1) * bin_s)
    hi = min(2 * len(arrivals) // 3, (coarse + 1) * bin_s)
    # To the unit on the changes over two units: free of any trend, and sharp at a
    # burst's edges, a rise split across a boundary included (one unit's changes would
    # match the larger halves of two split rises, a unit off as often as not).
    changes = [b - a for a, b in zip(arrivals, arrivals[2:], strict=False)]
    fine = {lag: _correlation(changes, lag) for lag in range(lo, hi + 1)}
    seconds = max(fine, key=lambda lag: fine[lag])
    return Period(seconds, fine[seconds])


def predict(
    arrivals: Sequence[float], period: int, start: int, lead: int, bound: Bound
) -> list[float]:
    """Predicted arrivals per second for the seconds ``start .. start + lead`` counted from
    the end of ``arrivals`` (0 is the next second; negative looks back, to compare a
    prediction with what came), from up to :data:`MAX_PERIODS` earlier periods of the same
    phase, each smoothed over :data:`SMOOTH_S` seconds and taken at its ``bound`` within a
    unit of the phase (the module's docstring says why): their median, or the lower of
    two (0 with fewer: what was seen once is not a pattern)."""
    end = len(arrivals)
    half = SMOOTH_S // 2
    before, pick = (1, min) if bound == "lower" else (0, max)
    out = []
    for ahead in range(start, start + lead + 1):
        seen = []
        for k in range(1, MAX_PERIODS + 1):
            at = end + ahead - k * period
            # That phase, and the unit after it (upper) or either side of it (lower);
            # complete units only (the phase may not have come round yet).
            if at + 1 - half < 0:
                break
            near = range(max(at - before, half), min(at + 1, end - half - 1) + 1)
            if near:
                seen.append(pick(sum(arrivals[i - half : i + half + 1]) / SMOOTH_S for i in near))
        # Seen twice at least, and agreed on: of two, the lower; of three, the median
        # (one period that lacked the pattern, or one outlier, does not move it). Seen
        # once is not a pattern: nothing is predicted.
        if len(seen) >= 3:
            out.append(median(seen))
        else:
            out.append(min(seen) if len(seen) == 2 else 0.0)
    return out


def _both_swing(values: Sequence[float], lag: int) -> bool:
    """The two copies compared at ``lag`` swing alike (each's range within half to twice
    the other's): a pattern seen once, against a stretch without it, is not a period,
    however the few points left correlate."""
    a = values[lag:]
    b = values[: len(values) - lag]
    swing_a, swing_b = max(a) - min(a), max(b) - min(b)
    return swing_a <= 2 * swing_b and swing_b <= 2 * swing_a


def _detrended(values: Sequence[float]) -> list[float]:
    """``values`` less their least-squares line."""
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx if sxx else 0.0
    return [v - mean_y - slope * (i - mean_x) for i, v in enumerate(values)]


def median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _correlation(values: Sequence[float], lag: int) -> float:
    a = values[lag:]
    b = values[: len(values) - lag]
    n = len(a)
    if n < 2:
        return 0.0
    mean_a = sum(a) / n
    mean_b = sum(b) / n
    cov = var_a = var_b = 0.0
    for x, y in zip(a, b, strict=True):
        dx, dy = x - mean_a, y - mean_b
        cov += dx * dy
        var_a += dx * dx
        var_b += dy * dy
    if var_a <= 0 or var_b <= 0:
        return 0.0
    return cov / math.sqrt(var_a * var_b)
