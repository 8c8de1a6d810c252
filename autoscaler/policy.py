"""Scaling decisions: pure functions of signals, the previous state and the time.

``decide(config, signals, state, now)`` returns the desired replica count and the next
state; nothing here reads a clock, a socket or a process, so every decision is a
deterministic test and the simulator runs the same code as production.

``rps`` and ``concurrency`` follow Knative's KPA (stable and panic windows, target
utilization, scale-up and scale-down rate limits, scale-to-zero grace), with its known
faults fixed:

- replicas already starting count as capacity on the way, so a panic does not order the
  same replicas again every tick (knative/serving#13284);
- leaving panic does not drop capacity in one cliff: scale-down is rate-limited against
  what was last asked for, and held for a delay window (#3153, #9121);
- draining replicas are not capacity (they leave once drained, #11596), and no replica
  is scaled away while another is still starting (kserve/kserve#1247).

``cpu_utilization`` and ``memory_utilization`` follow the HPA: desired = ceil(ready x
utilization / target) outside a ±10% tolerance, unready replicas set aside, no scale-down
on missing data, and a scale-down stabilization window (the highest recommendation of the
last 5 minutes wins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

MetricsType = Literal["cpu_utilization", "memory_utilization", "rps", "concurrency"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """One version endpoint's policy, with the defaults documented beside Knative's."""

    metrics_type: MetricsType = "concurrency"
    target_value: float = 1.0  # per replica (rps, concurrency) or percent (utilization)
    min_replica: int = 1
    max_replica: int = 2
    # KPA (Knative defaults in brackets)
    target_utilization: float = 0.7  # [0.7] headroom below the target
    stable_window: float = 60.0  # [60 s]
    panic_window: float = 6.0  # [10% of stable = 6 s]
    panic_threshold: float = 2.0  # [200%]
    max_scale_up_rate: float = 1000.0  # [1000]
    max_scale_down_rate: float = 2.0  # [2]
    scale_down_delay: float = 30.0  # [0 s]; ours holds capacity to avoid flapping
    scale_to_zero_grace: float = 30.0  # [30 s]
    # HPA (Kubernetes defaults in brackets)
    tolerance: float = 0.1  # [0.1]
    stabilization_window: float = 300.0  # [300 s] for scale-down


@dataclass(frozen=True, slots=True)
class Signals:
    """What the collectors saw, aggregated over the windows ending now."""

    stable: float = 0.0  # KPA: total rps/concurrency over the stable window
    panic: float = 0.0  # KPA: total over the panic window
    utilization: float | None = None  # HPA: mean percent of request over ready replicas
    ready: int = 0
    starting: int = 0
    draining: int = 0
    complete: bool = True  # every ready replica reported (HPA: else no scale-down)
    # Requests a gateway holds for this version because nothing is ready (activation).
    waiting: int = 0
    # Any traffic at all over the panic window (for utilization metrics, whose stable and
    # panic values are not request counts): drives scale-to-zero for every metric.
    traffic: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicyState:
    desired: int = 0  # what was last asked for
    panic_since: float | None = None
    panic_peak: int = 0
    last_active: float | None = None  # last time any traffic was seen
    recent: tuple[tuple[float, int], ...] = field(default_factory=tuple)  # (time, wanted)


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    state: PolicyState
    reason: str


def decide(config: PolicyConfig, signals: Signals, state: PolicyState, now: float) -> Decision:
    if config.metrics_type in ("rps", "concurrency"):
        decision = _kpa(config, signals, state, now)
    else:
        decision = _hpa(config, signals, state, now)
        decision = _hpa_to_zero(config, signals, state, now, decision)
    desired = max(config.min_replica, min(config.max_replica, decision.desired))
    if signals.waiting and signals.ready + signals.starting == 0:
        # Activation: requests are held at zero; start enough to take them now (the
        # windows add headroom once they see the traffic).
        wanted = 1
        if config.metrics_type == "concurrency":
            wanted = math.ceil(signals.waiting / config.target_value)
        desired = max(desired, min(config.max_replica, max(1, wanted)))
    if signals.starting and desired < signals.ready + signals.starting:
        # Never take away a replica that is still starting: requests may be waiting on it.
        desired = max(desired, min(config.max_replica, signals.ready + signals.starting))
    return Decision(desired, replace(decision.state, desired=desired), decision.reason)


def _kpa(config: PolicyConfig, s: Signals, state: PolicyState, now: float) -> Decision:
    per_replica = config.target_value * config.target_utilization
    active = s.stable > 0 or s.panic > 0 or s.waiting > 0
    last_active = now if active else state.last_active
    capacity = s.ready + s.starting  # what is up or on its way; draining is leaving
    want_stable = math.ceil(s.stable / per_replica) if per_replica > 0 else 0
    want_panic = math.ceil(s.panic / per_replica) if per_replica > 0 else 0
    up_limit = max(1, math.ceil(config.max_scale_up_rate * max(capacity, 1)))
    want_stable = min(want_stable, up_limit)
    want_panic = min(want_panic, up_limit)

    over = capacity > 0 and want_panic / capacity >= config.panic_threshold
    over = over or (capacity == 0 and want_panic > 0)
    panic_since = state.panic_since
    if over:
        panic_since = now
    elif panic_since is not None and now - panic_since >= config.stable_window:
        panic_since = None

    if panic_since is not None:
        # In panic: never scale down; grow to the panic view of demand.
        peak = max(state.panic_peak, want_panic, want_stable, state.desired)
        return Decision(peak, replace(state, panic_since=panic_since, panic_peak=peak,
                                      last_active=last_active), "panic")  # fmt: skip

    wanted = want_stable
    recent = tuple((t, w) for t, w in state.recent if now - t < config.scale_down_delay)
    recent = (*recent, (now, wanted))
    held = max(w for _, w in recent)  # scale-down delay: the peak of the last window
    # At most a factor max_scale_down_rate per decision (ceil: rounding can't exceed it).
    down_floor = math.ceil(state.desired / config.max_scale_down_rate) if state.desired else 0
    desired = max(held, down_floor) if held < state.desired else held
    reason = "stable"
    if held == 0:
        # No demand in the whole delay window: zero once the grace is over (not subject to
        # the rate limit), else keep one warm.
        idle_for = now - last_active if last_active is not None else math.inf
        if config.min_replica == 0 and idle_for >= config.scale_to_zero_grace:
            desired, reason = 0, "idle: to zero"
        else:
            desired = max(down_floor, 1) if state.desired > 0 else 0
            reason = "idle: within grace"
    next_state = PolicyState(desired, None, 0, last_active, recent)
    return Decision(desired, next_state, reason)


def _hpa_to_zero(
    config: PolicyConfig, s: Signals, state: PolicyState, now: float, decision: Decision
) -> Decision:
    """Utilization can't see idleness (an idle replica still uses memory); request
    traffic can. With ``min_replica: 0``, no traffic for the grace period means zero."""
    active = s.traffic > 0 or s.waiting > 0
    last_active = now if active or state.last_active is None else state.last_active
    next_state = replace(decision.state, last_active=last_active)
    if config.min_replica == 0 and not active and now - last_active >= config.scale_to_zero_grace:
        return Decision(0, next_state, "idle: to zero")
    return Decision(decision.desired, next_state, decision.reason)


def _hpa(config: PolicyConfig, s: Signals, state: PolicyState, now: float) -> Decision:
    current = max(state.desired, s.ready)
    if s.utilization is None or s.ready == 0:
        # No data (or nothing ready to measure): hold, as the HPA does.
        return Decision(current, state, "no data: hold")
    ratio = s.utilization / config.target_value
    wanted = s.ready if abs(ratio - 1.0) <= config.tolerance else math.ceil(s.ready * ratio)
    if wanted < current and not s.complete:
        wanted = current  # some replicas did not report: never scale down on missing data
    recent = tuple((t, w) for t, w in state.recent if now - t < config.stabilization_window)
    recent = (*recent, (now, wanted))
    desired = wanted if wanted >= current else max(w for _, w in recent)
    reason = "within tolerance" if wanted == s.ready else f"utilization {s.utilization:.0f}%"
    return Decision(desired, replace(state, recent=recent), reason)
