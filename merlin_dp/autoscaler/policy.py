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
  is scaled away while another is still starting and requests wait (kserve/kserve#1247).

When the gateway reports arrival rates and the service time (``Signals.rate_*``,
``service_time``, ``queued``, ``startup_time``), demand is sized by Little's law instead
of the raw metric, because a concurrency that counts queued requests runs away on a
burst (every queued request asks for 1/0.7 of a replica):

- replicas = ceil(arrival rate x service time / (target x target utilization)) (for
  ``rps``, arrival rate / (target x utilization));
- the arrival rate is the stable window's unless a shorter window differs from it by more
  than ``evidence`` Poisson standard deviations: the panic window overrules it both ways
  (a rise, or traffic that stopped: idleness shows in seconds, not after a minute), the
  last second overrules both on a step up. Scale-down needs the count to hold for two
  standard deviations more traffic (hysteresis: steady load near a boundary does not
  flap);
- a backlog gets replicas of its own, sized to drain the backlog expected when they land
  within max(``drain_time``, ``drain_startups`` x start-up time), and kept only while
  requests still queue;
- panic (the short windows in charge) does not hold capacity for a whole stable window
  after the burst: the rate limit, the delay window and the hysteresis above keep
  scale-down smooth, and the burst's replicas stop costing soon after it ends.

Without those signals the metric is used as measured, and the panic window counts when it
asks for ``panic_threshold`` times the capacity.

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
    scale_down_delay: float = 5.0  # [0 s]; ours holds the peak briefly (was 30 s: the
    # Little's-law sizing's hysteresis now prevents flapping, and 30 s of a burst's
    # replicas cost more than the burst; see loadtests/autoscale_sim.py)
    scale_to_zero_grace: float = 30.0  # [30 s]
    # Ours, for sizing by Little's law (no Knative counterpart):
    recent_window: float = 1.0  # the last second's arrivals show a step at once
    evidence: float = 3.0  # Poisson standard deviations before a short window overrules
    # A backlog gets replicas to drain it within the longer of these once they land (a
    # long start-up piles up a backlog too big to drain at once for a sane price):
    drain_time: float = 1.5  # seconds
    drain_startups: float = 0.25  # start-up times
    # Periodic load shorter than this is the reactive windows' job, not the forecast's:
    forecast_min_period: float = 40.0
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
    # Little's law inputs for rps and concurrency (0 = not measured): arrivals per second
    # over the stable, panic and recent windows; the mean seconds from dispatch to answer
    # (the gateways queue what replicas can't take, so no queueing is in it) over the
    # stable window, the last estimate while too few requests completed; requests the
    # gateways hold that no replica has taken yet (the backlog: the last second's mean,
    # or at zero the requests ``waiting``); requests on replicas (the last second's mean);
    # how long replicas recently took from being asked for to ready.
    rate_stable: float = 0.0
    rate_panic: float = 0.0
    rate_recent: float = 0.0
    service_time: float = 0.0
    queued: float = 0.0
    in_service: float = 0.0
    startup_time: float = 0.0
    # Periodic load (merlin_dp.autoscaler.forecast): its period in seconds (0: none found)
    # and when it was last looked for; the most arrivals per second it predicts over the
    # next start-up time (plus a tick), and what it predicted for the panic window just
    # past (its median second; to compare with what came: ``rate_panic``).
    period: int = 0
    period_found_at: float = -math.inf
    forecast_rate: float = 0.0
    forecast_past: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicyState:
    desired: int = 0  # what was last asked for
    panic_since: float | None = None
    last_active: float | None = None  # last time any traffic was seen
    recent: tuple[tuple[float, int], ...] = field(default_factory=tuple)  # (time, wanted)
    # A forecast that missed (the load it predicted did not come) is not trusted again
    # until this time: one period later.
    forecast_off_until: float = -math.inf


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
        if config.metrics_type == "concurrency" and signals.service_time <= 0:
            # (With Little's law the held requests are a backlog _kpa already sized.)
            wanted = math.ceil(signals.waiting / config.target_value)
        desired = max(desired, min(config.max_replica, max(1, wanted)))
    if (
        signals.starting
        and desired < signals.ready + signals.starting
        and (signals.waiting or signals.queued > 0 or signals.ready == 0)
    ):
        # Never take away a replica that is still starting while requests wait for one.
        # Otherwise the starting ones go first (the runtime's order), and a replica that
        # would land after the load it was for is not kept for a whole start-up time.
        desired = max(desired, min(config.max_replica, signals.ready + signals.starting))
    return Decision(desired, replace(decision.state, desired=desired), decision.reason)


def _kpa(config: PolicyConfig, s: Signals, state: PolicyState, now: float) -> Decision:
    per_replica = config.target_value * config.target_utilization
    if per_replica <= 0:
        return Decision(state.desired, state, "no target")
    capacity = s.ready + s.starting  # what is up or on its way; draining is leaving
    queued = s.queued  # the backlog (``waiting`` alone only starts activation, below)
    little = _little(config, s)
    off_until = state.forecast_off_until
    forecast = False
    if little is None and (s.in_service > 0 or s.queued > 0):
        # No service time yet (too few requests completed): what is in service and queued
        # now, a slot each, no headroom: one long request is one replica, not a burst. A
        # queue says little about how many replicas would drain it without a service
        # time, and sized on it the order grows with every second of start-up (Knative's
        # runaway): while replicas are on their way or just landed, wait for them to
        # measure it.
        busy = math.ceil(round(s.in_service / config.target_value, 1))
        want = math.ceil(round((s.in_service + s.queued) / config.target_value, 1))
        want = max(busy, min(want, max(capacity, 1)))
        over, extra, active = False, 0, True
    elif little is None:
        # The metric as measured (a concurrency that counts the backlog, too).
        want_stable = math.ceil(round(s.stable / per_replica, 9))
        want_panic = math.ceil(round(s.panic / per_replica, 9))
        over = want_panic > 0 and want_panic >= config.panic_threshold * capacity
        want, extra = (max(want_stable, want_panic) if over else want_stable), 0
        active = s.stable > 0 or s.panic > 0 or queued > 0 or s.waiting > 0
    else:
        unit, r_stable, r_panic = little
        rate, how, sigma = _arrival_rate(config, r_stable, r_panic, s.rate_recent)
        want = math.ceil(round(rate * unit / per_replica, 9))
        if want < state.desired:
            # Hysteresis: fewer replicas only if two standard deviations more traffic
            # would not need them either (steady load near a boundary does not flap).
            high = rate + 2 * sigma
            want = min(state.desired, math.ceil(round(high * unit / per_replica, 9)))
        if config.metrics_type == "concurrency":
            # Requests in service hold their slots however long they take.
            want = max(want, math.ceil(round(s.in_service / config.target_value, 1)))
        want_panic = math.ceil(round(r_panic * unit / per_replica, 9))
        over = how != "stable" and want > capacity
        over = over or (want_panic > 0 and want_panic >= config.panic_threshold * capacity)
        if s.period and now >= off_until:
            if _forecast_missed(config, s, unit, per_replica, want):
                off_until = now + s.period  # trust it again once the cycle has come round
            else:
                want_ahead = math.ceil(round(s.forecast_rate * unit / per_replica, 9))
                forecast = want_ahead > want
                want = max(want, want_ahead)
        extra = _drain_replicas(config, s, rate, unit, want, queued)
        active = r_panic > 0 or s.panic > 0 or queued > 0 or s.waiting > 0 or s.in_service > 0
    last_active = now if active else state.last_active
    up_limit = max(1, math.ceil(config.max_scale_up_rate * max(capacity, 1)))
    panic_since = now if over else None

    # Scale-down delay: the rate part holds its peak over the window; the backlog part
    # leaves as soon as the backlog is gone.
    recent = tuple((t, w) for t, w in state.recent if now - t < config.scale_down_delay)
    recent = (*recent, (now, want))
    held = max(w for _, w in recent)
    wanted = min(up_limit, held + extra)
    # At most a factor max_scale_down_rate per decision (ceil: rounding can't exceed it).
    down_floor = math.ceil(state.desired / config.max_scale_down_rate) if state.desired else 0
    desired = max(wanted, down_floor) if wanted < state.desired else wanted
    if little is not None and queued > 0 and wanted < state.desired:
        desired = state.desired  # a backlog is still draining: keep what drains it
    reason = "panic" if over else ("backlog" if extra else ("forecast" if forecast else "stable"))
    if wanted == 0:
        # No demand in the whole delay window: zero once the grace is over (not subject to
        # the rate limit), else keep one warm.
        idle_for = now - last_active if last_active is not None else math.inf
        if config.min_replica == 0 and idle_for >= config.scale_to_zero_grace:
            desired, reason = 0, "idle: to zero"
        else:
            desired = max(down_floor, 1) if state.desired > 0 else 0
            reason = "idle: within grace"
    next_state = PolicyState(desired, panic_since, last_active, recent, off_until)
    return Decision(desired, next_state, reason)


def _forecast_missed(
    config: PolicyConfig, s: Signals, unit: float, per_replica: float, want: int
) -> bool:
    """The load the forecast predicted for the panic window just past did not come: half
    of it, beyond Poisson noise, is missing, and it asked for replicas the traffic did
    not need."""
    predicted, came = s.forecast_past, s.rate_panic
    noise = config.evidence * math.sqrt(max(predicted, 1e-9) / config.panic_window)
    needed = math.ceil(round(predicted * unit / per_replica, 9))
    return predicted - 2 * came > noise and needed > want


def _little(config: PolicyConfig, s: Signals) -> tuple[float, float, float] | None:
    """(metric units per request/s, stable and panic arrival rates), or None when the
    arrival rate or the service time is not measured: then the metric is used as is."""
    if config.metrics_type == "rps":
        return 1.0, s.stable, s.panic
    if s.service_time > 0:
        return s.service_time, s.rate_stable, s.rate_panic
    return None


def _arrival_rate(
    config: PolicyConfig, stable: float, panic: float, recent: float
) -> tuple[float, str, float]:
    """The arrival rate to size for, which window says so, and its standard deviation.

    The stable window, unless a shorter one differs from it by more than ``evidence``
    standard deviations of a Poisson count: the panic window overrules it both ways (a
    rise, or traffic that has fallen away), and the last ``recent_window`` seconds
    overrule both when they show a step up that the panic window starts to confirm.
    """
    z = config.evidence
    top = max(stable, panic, 1.0 / config.panic_window)
    sigma = math.sqrt(top / config.panic_window + top / config.stable_window)
    rate, how = stable, "stable"
    spread = math.sqrt(stable / config.stable_window)
    if abs(panic - stable) > z * sigma:
        rate, how = panic, "panic"
        spread = math.sqrt(panic / config.panic_window)
    if recent > 0 and config.recent_window > 0:
        base = max(rate, 1.0 / config.recent_window)
        jump = recent - base > z * math.sqrt(base / config.recent_window)
        if jump and panic - stable > 0.75 * z * sigma:
            rate, how = recent, "recent"
            spread = math.sqrt(recent / config.recent_window)
    return rate, how, spread


def _drain_replicas(
    config: PolicyConfig, s: Signals, rate: float, unit: float, want: int, queued: float
) -> int:
    """Replicas beyond ``want`` to clear, soon after they land, the backlog left when
    replicas ordered now land: the backlog now, plus what piles up (or minus what the
    ready replicas drain) until then; starting ones land half-way on average."""
    if queued <= 0 and rate * unit <= s.ready * config.target_value:
        return 0
    per_replica = config.target_value / unit  # requests/s one replica serves flat out
    lead = s.startup_time
    shortfall = rate - per_replica * s.ready
    backlog = queued + shortfall * lead - per_replica * s.starting * lead / 2
    spare = want * per_replica - rate  # what the sized replicas drain beside the arrivals
    drain = max(config.drain_time, config.drain_startups * lead, 1e-9)
    need = backlog / drain - spare
    return math.ceil(round(need / per_replica, 9)) if backlog > 0 and need > 0 else 0


def _hpa_to_zero(
    config: PolicyConfig, s: Signals, state: PolicyState, now: float, decision: Decision
) -> Decision:
    """Utilization can't see idleness (an idle replica still uses memory); request
    traffic can. With ``min_replica: 0``, no traffic for the grace period means zero."""
    active = s.rate_panic > 0 or s.waiting > 0
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
