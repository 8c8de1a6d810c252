"""Numbers about a run: CPU seconds of a process tree (from ``/proc``), medians, spreads
and percentiles, and the noise guard (``shared/BENCHMARKING.md``), which calls a run
inconclusive, a warning and never a failure."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence

from loadtests.harness.procfs import children_by_parent, stat_fields

# Noise guard thresholds: spread = (max - min) / median across rounds.
NGINX_SPREAD_LIMIT = 0.10
RATIO_SPREAD_LIMIT = 0.35
# The machine is busy with something else when its 1-minute load average is above this
# share of its CPUs before the run starts.
BUSY_LOAD_FRACTION = 0.5

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` in seconds, from /proc/<pid>/stat."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` plus its live descendants (a supervisor's workers, say)."""
    children = children_by_parent()
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            total += read_cpu_seconds(current)
        except (OSError, ValueError, IndexError):
            if current == pid:
                raise
            continue
        stack.extend(child.pid for child in children.get(current, []))
    return total


def median(values: Sequence[float]) -> float:
    """The median of `values` (NaN when there are none)."""
    return statistics.median(values) if values else float("nan")


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much per-round figures vary (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else float("inf")


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ascending `sorted_values` (NaN when there are none)."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def busy_machine() -> tuple[float, int] | None:
    """(1-minute load average, usable CPUs) when the load is above BUSY_LOAD_FRACTION of
    the CPUs, that is when other work competes with a run about to start; else None."""
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    return (load, cpus) if load > BUSY_LOAD_FRACTION * cpus else None
