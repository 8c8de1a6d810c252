"""The one place the policy's input is built: per-second signal records in, Signals out.

:func:`policy_input` is a pure function of a version's :class:`VersionSeries` (the
gateways' records, summed), its :class:`Replicas` as the runtime sees them, the time, and
the previous input (estimates carry over: the service time while too few requests
complete, the period the forecast found). Production's decision loop
(:mod:`merlin_dp.autoscaler.scaler`), this project's simulator
(``loadtests/autoscale_sim.py``) and any other simulator go through
:class:`VersionAutoscaler`, which feeds records in and asks
:func:`~merlin_dp.autoscaler.policy.decide`; nothing else builds policy input. A
simulator therefore sees exactly what production sees: what a gateway can count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from merlin_dp.autoscaler.forecast import find_period, median, predict
from merlin_dp.autoscaler.policy import Decision, PolicyConfig, PolicyState, Signals, decide
from merlin_dp.autoscaler.window import ARRIVALS_HORIZON_S, MINUTES_HORIZON, VersionSeries
from merlin_dp.spec.signals import SignalRecord

# Completions in the stable window before their mean time counts as the service time.
MIN_SERVICE_SAMPLE = 20
# Periods this long and longer (minutes) are looked for minute by minute, in two days.
LONG_PERIOD_MIN = 120
# How often, at most, the history is searched for a period (the search costs
# milliseconds); at least twice per shortest period looked for.
PERIOD_EVERY_S = 20.0


@dataclass(frozen=True, slots=True)
class Replicas:
    """A version's replicas as the runtime sees them."""

    ready: int = 0
    starting: int = 0
    draining: int = 0
    startup_time: float = 0.0  # seconds the last replica took from being asked for to ready


def policy_input(
    config: PolicyConfig,
    series: VersionSeries,
    replicas: Replicas,
    now: float,
    previous: Signals | None = None,
    *,
    waiting: int = 0,
    utilization: float | None = None,
    complete: bool = True,
) -> Signals:
    """The policy's input at ``now`` (a decision's time; the current second is still
    filling, so every window ends with the last complete second).

    ``waiting`` is what gateways said is held at zero (their pokes); ``utilization`` and
    ``complete`` the replicas' CPU or memory for the HPA's metrics.
    """
    rps = series.requests
    if config.metrics_type == "rps":
        metric = rps
    elif config.metrics_type == "concurrency":
        metric = series.concurrency
    else:
        metric = rps  # request traffic still decides idleness (scale to zero)
    completions = series.completions.total(now, config.stable_window)
    if completions >= MIN_SERVICE_SAMPLE:
        service_time = series.service_seconds.total(now, config.stable_window) / completions
    else:
        service_time = previous.service_time if previous is not None else 0.0
    period, found_at, forecast_rate, forecast_past = _forecast(
        config, series, replicas, now, previous
    )
    return Signals(
        stable=metric.average(now, config.stable_window),
        panic=metric.average(now, config.panic_window),
        utilization=utilization,
        ready=replicas.ready,
        starting=replicas.starting,
        draining=replicas.draining,
        complete=complete,
        waiting=waiting,
        rate_stable=rps.average(now, config.stable_window),
        rate_panic=rps.average(now, config.panic_window),
        rate_recent=rps.average(now, config.recent_window),
        service_time=service_time,
        queued=max(float(waiting), series.queued.last(now)),
        in_service=series.in_service.last(now),
        startup_time=replicas.startup_time,
        period=period,
        period_found_at=found_at,
        forecast_rate=forecast_rate,
        forecast_past=forecast_past,
    )


def _forecast(
    config: PolicyConfig,
    series: VersionSeries,
    replicas: Replicas,
    now: float,
    previous: Signals | None,
) -> tuple[int, float, float, float]:
    """(period in seconds or 0, when it was looked for, the most arrivals per second
    predicted over the next start-up time and a tick, the median second predicted for
    the panic window just past).

    Periods up to 40 minutes are looked for in the last hour, second by second; longer
    ones (a daily cycle) in the last two days, minute by minute, when there is no shorter
    one.
    """
    period, found_at = 0, -math.inf
    if previous is not None:
        period, found_at = previous.period, previous.period_found_at
    rps = series.requests
    history: list[float] | None = None
    if now - found_at >= min(PERIOD_EVERY_S, config.forecast_min_period / 2):
        history = rps.series(now, ARRIVALS_HORIZON_S)
        period = find_period(_since_first(history), int(config.forecast_min_period)).seconds
        if not period:
            minutes = series.requests_by_minute.series(now / 60, MINUTES_HORIZON)
            period = 60 * find_period(_since_first(minutes), LONG_PERIOD_MIN).seconds
        found_at = now
    if not period:
        return 0, found_at, 0.0, 0.0
    lead = math.ceil(replicas.startup_time) + 1  # start-up, and the next decision
    if period >= 60 * LONG_PERIOD_MIN:
        by_minute = period // 60
        span = min(MINUTES_HORIZON, 3 * by_minute + 2)
        recent = _since_first(series.requests_by_minute.series(now / 60, span))
        ahead = predict(recent, by_minute, 0, math.ceil(lead / 60), "upper")
        past = predict(recent, by_minute, -1, 0, "lower")[0]
        return period, found_at, max(ahead) / 60, past / 60
    window = math.ceil(config.panic_window)
    span = min(ARRIVALS_HORIZON_S, 3 * period + window + 2)
    # Seconds before the first traffic are no data: the forecast averages only seen ones.
    recent = _since_first(rps.series(now, span) if history is None else history[-span:])
    # Ordered for the most the period's phase allows; a miss is judged on the least, and
    # on the median second (a burst's edge, smoothed a second early, is not a miss).
    forecast_rate = max(predict(recent, period, 0, lead, "upper"))
    forecast_past = median(predict(recent, period, -window, window - 1, "lower"))
    return period, found_at, forecast_rate, forecast_past


def _since_first(history: list[float]) -> list[float]:
    """The history from its first traffic: seconds before it are not load, just absent."""
    for i, value in enumerate(history):
        if value:
            return history[i:]
    return []


class VersionAutoscaler:
    """One version endpoint's decisions: records in, the replica count out.

    Holds what carries from one decision to the next (the windows, the last input, the
    policy's state); production's loop keeps one per version, a simulator one per run.
    """

    def __init__(
        self, config: PolicyConfig, state: PolicyState, series: VersionSeries | None = None
    ) -> None:
        self.config = config
        self.series = series if series is not None else VersionSeries()
        self.state = state
        self.signals: Signals | None = None
        self.reason = ""

    def observe(self, records: Iterable[SignalRecord], now: float) -> None:
        for record in records:
            self.series.add(record, now)

    def decide(
        self,
        replicas: Replicas,
        now: float,
        *,
        waiting: int = 0,
        utilization: float | None = None,
        complete: bool = True,
        config: PolicyConfig | None = None,
    ) -> Decision:
        if config is not None:
            self.config = config
        signals = policy_input(
            self.config, self.series, replicas, now, self.signals,
            waiting=waiting, utilization=utilization, complete=complete,
        )  # fmt: skip
        decision = decide(self.config, signals, self.state, now)
        self.signals = signals
        self.state = decision.state
        self.reason = decision.reason
        return decision
