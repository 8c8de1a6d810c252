"""The autoscalers this project's policy is measured against, for :mod:`loadtests.autoscale_sim`.

Each is a small class with a ``decide(view)`` called every simulated second, returning the
replica count it asks for (or ``None``: no change). They read only what their real
counterparts can read; only the oracle reads the trace.

- :class:`KPA` — Knative's Pod Autoscaler as published (``pkg/autoscaler/scaling`` and the
  ``config-autoscaler`` defaults): 2 s tick; stable window 60 s and panic window 6 s (10%)
  averaged the Knative way (:class:`KnativeWindow`); target = target value x target
  utilization 0.7; desired = ceil(observed / target), kept within
  [floor(ready / max-scale-down-rate 2), ceil(max-scale-up-rate 1000 x ready)] with
  ready counted as at least 1; panic when the panic desire is at least 200% of the ready
  count, and while panicking (until a stable window has passed without crossing the
  threshold) only increases apply; scale-down-delay 0; then the reconciler's bounds
  (min-scale 0, max-scale 0 = unbounded) and scale to zero: a desired 0 keeps one
  replica for the scale-to-zero grace period (30 s) before going to zero. The
  concurrency metric is what the queue-proxies and the activator report: every request
  in the system, the backlog included. A revision at zero with waiting requests is
  decided at once (the activator's poke), not at the next tick. The autoscaler has been
  running all along (a freshly started one would begin in panic at its current scale).
- :class:`HPA` — the Kubernetes HPA on CPU with its defaults: 15 s sync; CPU from
  metrics-server, which scrapes every 15 s and reports the mean over the preceding 15 s
  (so the HPA reads a sample 8 s old covering [t-23 s, t-8 s)); tolerance 0.1; the replica
  calculator's handling of unready pods (0% when scaling up) and of ready pods with no
  sample yet (100% of target when scaling down, 0% when scaling up); scale-up policy
  max(100%, 4 pods) per 15 s, no scale-up stabilization; scale-down stabilization 300 s
  (the highest recommendation of the last 5 minutes), 100% per 15 s; min 1 replica (the
  HPA cannot scale to zero). CPU is proportional to busy slots: a replica with all its
  ``limit`` slots busy is at 100%; the target is 70%.
- :class:`Oracle` — clairvoyant: at every second it asks for the most replicas any moment
  in the next start-up time needs, sizing λ(τ) at 70% utilization of the mean service
  time: ceil(λ(τ) x 50 ms / (limit x 0.7)). So capacity for λ(t + startup) is ordered
  exactly one start-up time ahead, and released the moment it is no longer needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtests.autoscale_sim import (
    CLUSTER_CAP,
    HISTORY_S,
    SERVICE_MEAN_S,
    TARGET_UTILIZATION,
    View,
    needed_peak,
    needed_replicas,
)

# --- Knative KPA -----------------------------------------------------------------------------


@dataclass
class KnativeWindow:
    """Knative's windowed average over per-second buckets (``TimeWindow.WindowAverage``).

    Seconds with no sample (no ready replica reported and the activator held nothing) are
    not written. While writes continue, gaps count as zeros; an average covers only the
    written span: from the first write (reset after a whole window without writes) to the
    last one, at most a window long. A window with no write at all averages to 0.
    """

    window: int
    first_write: int | None = None
    last_write: int | None = None

    def record(self, second: int, written: bool) -> None:
        if not written:
            return
        if self.last_write is None or second - self.last_write >= self.window:
            self.first_write = second
        self.last_write = second

    def average(self, series: list[float], now: int) -> float:
        """Mean as of the end of second ``now - 1`` (the last complete one)."""
        last = now - 1
        if self.last_write is None or self.first_write is None:
            return 0.0
        if last - self.last_write >= self.window:
            return 0.0
        lo = max(self.first_write, last - self.window + 1)
        hi = self.last_write
        return sum(series[lo + HISTORY_S : hi + HISTORY_S + 1]) / (hi - lo + 1)


@dataclass
class KPAConfig:
    metric: str = "concurrency"  # or "rps"
    target: float = 1.0  # per replica: containerConcurrency, or rps at full load
    target_utilization: float = 0.7
    stable_window: int = 60
    panic_window: int = 6
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_to_zero_grace: float = 30.0
    tick: int = 2
    min_scale: int = 0
    max_scale: int = 0  # 0: unbounded (the cluster's size)


class KPA:
    def __init__(self, view: View, config: KPAConfig) -> None:
        self.config = config
        self.stable = KnativeWindow(config.stable_window)
        self.panic = KnativeWindow(config.panic_window)
        for second in range(-HISTORY_S, 0):
            self._record(view, second)
        self.panic_time: float | None = None
        self.max_panic_pods = 0
        self.inactive_since: float | None = None

    def _record(self, view: View, second: int) -> None:
        written = view.written[second + HISTORY_S]
        self.stable.record(second, written)
        self.panic.record(second, written)

    def decide(self, view: View) -> int | None:
        self._record(view, view.now - 1)
        cfg = self.config
        poke = view.live == 0 and view.queued > 0
        if view.now % cfg.tick and not poke:
            return None
        now = float(view.now)
        series = view.arrivals if cfg.metric == "rps" else view.concurrency
        stable = self.stable.average(series, view.now)
        panic = self.panic.average(series, view.now)
        target = max(0.01, cfg.target * cfg.target_utilization)
        ready = max(1.0, float(view.ready))
        max_up = math.ceil(cfg.max_scale_up_rate * ready)
        max_down = math.floor(ready / cfg.max_scale_down_rate)
        dspc = math.ceil(round(stable / target, 9))
        dppc = math.ceil(round(panic / target, 9))
        desired_stable = min(max(dspc, max_down), max_up)
        desired_panic = min(max(dppc, max_down), max_up)
        over = dppc / ready >= cfg.panic_threshold
        if over:
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + cfg.stable_window < now:
            self.panic_time = None
            self.max_panic_pods = 0
        desired = desired_stable
        if self.panic_time is not None:
            desired = max(desired, desired_panic)
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods
        # The reconciler: bounds, then scale to zero after the grace period.
        desired = max(desired, cfg.min_scale)
        if cfg.max_scale:
            desired = min(desired, cfg.max_scale)
        if desired == 0:
            if self.inactive_since is None:
                self.inactive_since = now
            if view.live > 0 and now - self.inactive_since < cfg.scale_to_zero_grace:
                return 1
            return 0
        self.inactive_since = None
        return desired


def kpa_concurrency(view: View) -> KPA:
    """Default KPA on concurrency, containerConcurrency = the replica's limit."""
    return KPA(view, KPAConfig(metric="concurrency", target=view.limit))


def kpa_concurrency_capped(view: View) -> KPA:
    """Default KPA on concurrency with max-scale at twice the trace's needed peak."""
    cap = 2 * needed_peak(view.trace, view.limit)
    return KPA(view, KPAConfig(metric="concurrency", target=view.limit, max_scale=cap))


def kpa_rps(view: View) -> KPA:
    """Default KPA on rps, target = what one replica serves at full load."""
    return KPA(view, KPAConfig(metric="rps", target=view.limit / SERVICE_MEAN_S))


# --- Kubernetes HPA --------------------------------------------------------------------------


@dataclass
class HPAConfig:
    target_percent: float = 100 * TARGET_UTILIZATION
    sync_period: int = 15
    scrape_interval: int = 15  # metrics-server --metric-resolution
    scrape_offset: int = 7  # scrapes are not aligned with the HPA's sync
    tolerance: float = 0.1
    scale_down_stabilization: int = 300
    scale_up_percent: float = 100.0  # per sync period
    scale_up_pods: int = 4
    min_replicas: int = 1
    max_replicas: int = CLUSTER_CAP


class HPA:
    def __init__(self, view: View, config: HPAConfig | None = None) -> None:
        self.config = config or HPAConfig()
        self.recommendations: list[tuple[int, int]] = []  # (time, recommendation)

    def _sample(self, view: View) -> tuple[float, float, int] | None:
        """The latest metrics-server sample: (busy slot-seconds, slot-seconds, ready pods)
        over the 15 s before the last scrape."""
        cfg = self.config
        scrape = (view.now - cfg.scrape_offset) // cfg.scrape_interval * cfg.scrape_interval
        scrape += cfg.scrape_offset
        lo, hi = scrape - cfg.scrape_interval + HISTORY_S, scrape + HISTORY_S
        slots = sum(view.slots[lo:hi])
        if slots <= 0:
            return None
        return sum(view.busy[lo:hi]), slots, int(view.slots[hi - 1]) // view.limit

    def decide(self, view: View) -> int | None:
        cfg = self.config
        if view.live < cfg.min_replicas:
            return cfg.min_replicas  # the HPA never leaves a workload below its minimum
        if view.now % cfg.sync_period:
            return None
        current = view.live
        sample = self._sample(view)
        if sample is None or current == 0:
            return None if current else cfg.min_replicas
        busy, slots, sampled_ready = sample
        usage = 100.0 * busy / slots  # mean CPU percent of request over sampled pods
        ratio = usage / cfg.target_percent
        with_metrics = min(view.ready, sampled_ready)
        missing = max(0, view.ready - sampled_ready)
        unready = view.starting
        up_with_unready = unready > 0 and ratio > 1.0
        if not up_with_unready and missing == 0:
            if abs(1.0 - ratio) <= cfg.tolerance:
                rec = current
            else:
                rec = math.ceil(round(ratio * with_metrics, 9))
        else:
            total = usage * with_metrics
            count = with_metrics
            if missing:
                total += (cfg.target_percent if ratio < 1.0 else 0.0) * missing
                count += missing
            if up_with_unready:
                count += unready  # at 0%
            new_ratio = total / (cfg.target_percent * count) if count else 0.0
            if (
                abs(1.0 - new_ratio) <= cfg.tolerance
                or (ratio < 1.0 < new_ratio)
                or (ratio > 1.0 > new_ratio)
            ):
                rec = current
            else:
                rec = math.ceil(round(new_ratio * count, 9))
                if (new_ratio < 1.0 and rec > current) or (new_ratio > 1.0 and rec < current):
                    rec = current
        # Behaviours: stabilize scale-down over 5 minutes, limit the scale-up rate.
        now = view.now
        self.recommendations = [
            (t, r) for t, r in self.recommendations if now - t < cfg.scale_down_stabilization
        ]
        self.recommendations.append((now, rec))
        down = max(r for _, r in self.recommendations)
        desired = current
        if desired < rec:
            desired = rec
        if desired > down:
            desired = down
        up_limit = max(
            math.ceil(current * (1 + cfg.scale_up_percent / 100)), current + cfg.scale_up_pods
        )
        desired = min(desired, up_limit)
        return max(cfg.min_replicas, min(cfg.max_replicas, desired))


def hpa_cpu(view: View) -> HPA:
    return HPA(view)


# --- the oracle -------------------------------------------------------------------------------


class Oracle:
    def __init__(self, view: View) -> None:
        self.trace = view.trace
        self.startup = view.startup
        self.limit = view.limit

    def decide(self, view: View) -> int | None:
        t = view.now
        return max(
            needed_replicas(self.trace.rate(float(tau)), self.limit)
            for tau in range(t, t + self.startup + 1)
        )


def oracle(view: View) -> Oracle:
    return Oracle(view)
