"""The one signal path: per-second records, as a gateway emits them, through
policy_input and the policy, on a fake clock (Knative's style: every rule a test)."""

from __future__ import annotations

import math

import pytest

from merlin_dp.autoscaler.forecast import find_period, predict
from merlin_dp.autoscaler.inputs import Replicas, VersionAutoscaler, policy_input
from merlin_dp.autoscaler.policy import PolicyConfig, PolicyState
from merlin_dp.autoscaler.window import VersionSeries
from merlin_dp.spec.signals import SignalRecord

DEFAULT = PolicyConfig()  # concurrency, target 1, min 1, max 2: a deploy's defaults
WIDE = PolicyConfig(min_replica=0, max_replica=100)


def rec(second: int, requests: int = 0, in_service: float = 0.0, queued: float = 0.0,
        completions: int = 0, service_seconds: float = 0.0) -> SignalRecord:  # fmt: skip
    return {"project": "p", "model": "m", "version": "1", "second": second,
            "requests": requests, "concurrency": in_service + queued,
            "in_service": in_service, "queued": queued, "completions": completions,
            "service_seconds": service_seconds}  # fmt: skip


def steady(second: int, rate: int = 100, service: float = 0.05) -> SignalRecord:
    return rec(second, rate, rate * service, 0.0, rate, rate * service)


def test_the_service_time_is_dispatch_to_answer_however_long_the_queue() -> None:
    series = VersionSeries()
    # 60 s in which 100 requests/s arrive, 40 replicas' worth of them wait in the gateway,
    # and those served took 50 ms each from dispatch: the queue is not service time.
    for s in range(60):
        series.add(rec(s, 100, 5.0, 40.0, 100, 5.0), 60)
    signals = policy_input(WIDE, series, Replicas(ready=8), 60.0)
    assert math.isclose(signals.service_time, 0.05)
    assert signals.queued == 40.0 and signals.in_service == 5.0
    assert signals.rate_stable == 100.0


def test_too_few_completions_keep_the_last_estimate() -> None:
    series = VersionSeries()
    for s in range(60):
        series.add(steady(s), 60)
    first = policy_input(WIDE, series, Replicas(ready=8), 60.0)
    later = VersionSeries()
    later.add(rec(100, 1, 1.0, 0.0, 1, 40.0), 101)  # one 40 s request ended
    assert policy_input(WIDE, later, Replicas(ready=8), 101.0, first).service_time == 0.05


def test_one_long_request_does_not_change_scale() -> None:
    # One request arrives and stays in service for 40 s on a version with the defaults.
    for previous_service_time in (None, 0.05):
        scaler = VersionAutoscaler(DEFAULT, PolicyState(desired=1, last_active=0.0))
        if previous_service_time is not None:
            for s in range(-60, 0):
                scaler.observe([steady(s, 1)], s + 1)
        asked = []
        for now in range(1, 45):
            second = now - 1
            record = rec(second, 1 if second == 0 else 0, 1.0)
            if second == 40:
                record = rec(second, 0, 0.5, 0.0, 1, 40.0)
            scaler.observe([record], now)
            asked.append(scaler.decide(Replicas(ready=1, startup_time=5), now).desired)
        assert set(asked) == {1}, (previous_service_time, asked)


def test_a_backlog_behind_ready_replicas_gets_replicas_of_its_own() -> None:
    series = VersionSeries()
    for s in range(60):
        series.add(steady(s, 20), 60)
    series.add(rec(60, 20, 2.0, 0.0, 20, 1.0), 61)
    quiet = policy_input(WIDE, series, Replicas(ready=2, startup_time=5), 61.0)
    scaler = VersionAutoscaler(WIDE, PolicyState(desired=2))
    scaler.series = series
    assert scaler.decide(Replicas(ready=2, startup_time=5), 61.0).desired == math.ceil(
        20 * 0.05 / 0.7
    )
    # The same arrivals, but 500 requests waited in the gateway through the last second:
    # more than the ready replicas' spare 20 requests/s drain in a start-up time.
    series.add(rec(61, 20, 2.0, 500.0, 20, 1.0), 62)
    backlog = policy_input(WIDE, series, Replicas(ready=2, startup_time=5), 62.0, quiet)
    assert backlog.queued == 500.0
    decision = scaler.decide(Replicas(ready=2, startup_time=5), 62.0)
    assert decision.reason == "backlog" and decision.desired > 2


BURST_AT, PERIOD, WIDTH, STARTUP = 60, 120, 15, 5


def burst_rate(second: int) -> int:
    phase = second - BURST_AT
    return 100 if phase >= 0 and phase % PERIOD < WIDTH else 2


def test_the_forecast_finds_the_period_and_predicts_the_next_burst() -> None:
    history = [float(burst_rate(s)) for s in range(BURST_AT + 2 * PERIOD)]
    period = find_period(history)
    assert period.seconds == PERIOD and period.strength > 0.9
    # Ten seconds before the third burst: its first seconds are predicted at its rate.
    upto = BURST_AT + 2 * PERIOD - 10
    ahead = predict(history[:upto], PERIOD, 0, 15, "upper")
    assert max(ahead[:8]) < 10 and max(ahead[10:]) > 60
    assert find_period([2.0] * 600).seconds == 0  # flat load has no period


# Two 4 s bursts of 40 requests/s over a trickle of 3/s, counted per second as a gateway
# counts them (Poisson counts), 26 s from the first request; the third burst is due
# 1.6-1.8 s after the last second. The bursts' edges fall across second boundaries
# differently: the first began at 3.39 s and 3.42 s, the second at 15.66 s and 15.74 s.
# The first reads as 12 s apart; the second, 12.32 s, as 13.
SPLIT_EDGES = [
    [6, 2, 2, 23, 42, 43, 59, 20, 3, 5, 1, 2, 4, 2, 1, 14, 34, 51, 51, 43, 2, 3, 3, 4, 3, 4, 2],
    [4, 2, 2, 24, 47, 38, 52, 9, 4, 2, 2, 1, 2, 4, 5, 17, 43, 33, 41, 40, 2, 5, 3, 3, 6, 4, 3],
]


@pytest.mark.parametrize("counts", SPLIT_EDGES)
def test_a_burst_a_unit_out_of_phase_is_still_ordered_for_in_full(counts: list[int]) -> None:
    # Before, one unit's changes matched the first pair on its rises' larger halves (13 s),
    # and the lower of two copies out of phase was the burst's edge, not its height (22
    # and 24 requests/s: 2 replicas of the 3 its 40/s need at 50 ms).
    history = [float(c) for c in counts]
    period = find_period(history, 8).seconds
    assert period in (12, 13)  # as they were 12.27 and 12.32 s apart
    ahead = predict(history, period, 0, 2, "upper")
    assert math.ceil(max(ahead) * 0.05 / 0.7) >= math.ceil(40 * 0.05 / 0.7), ahead
    # The miss check reads the least: the trickle's seconds just past, not a burst.
    assert max(predict(history, period, -1, 0, "lower")) < 10


def drive(skip_third: bool) -> list[tuple[int, int, str]]:
    """A batch caller every PERIOD seconds over a trickle, through the signal path: the
    decisions (time, desired, reason) around the third burst."""
    scaler = VersionAutoscaler(WIDE, PolicyState(desired=1, last_active=0.0))
    out = []
    for now in range(1, BURST_AT + 2 * PERIOD + 40):
        second = now - 1
        rate = burst_rate(second)
        if skip_third and second >= BURST_AT + 2 * PERIOD:
            rate = 2
        scaler.observe([steady(second, rate)], now)
        d = scaler.decide(Replicas(ready=scaler.state.desired, startup_time=STARTUP), now)
        if now >= BURST_AT + 2 * PERIOD - 20:
            out.append((now, d.desired, d.reason))
    return out


def test_a_burst_seen_twice_is_prewarmed_one_startup_ahead_the_third_time() -> None:
    third = BURST_AT + 2 * PERIOD
    needed = math.ceil(100 * 0.05 / 0.7)
    decisions = drive(skip_third=False)
    before = [d for t, d, _ in decisions if t <= third]
    assert max(before) >= needed  # capacity ordered before the burst began
    first_up = next(t for t, d, _ in decisions if d >= needed)
    assert third - STARTUP - 2 <= first_up <= third - STARTUP + 1
    assert any(r == "forecast" for _, _, r in decisions)
    # ...and not long before: 15 s earlier, the trickle's replica only.
    assert all(d <= 1 for t, d, _ in decisions if t < third - STARTUP - 3)


def test_a_forecast_that_misses_lets_the_replicas_go_soon() -> None:
    third = BURST_AT + 2 * PERIOD
    decisions = drive(skip_third=True)
    # It pre-warmed; the burst did not come; within a few seconds of when it should
    # have, and the scale-down delay after, the replicas are let go.
    assert max(d for _, d, _ in decisions) > 1
    late = [d for t, d, _ in decisions if t >= third + 15]
    assert late and max(late) <= 1


def test_a_daily_cycle_is_found_minute_by_minute_and_forecast_ahead() -> None:
    # Two days of a daily cycle (10 to 190 requests/s), then an hour before the morning
    # rise: a 30-minute start-up must be ordered for the load half an hour ahead.
    def rate(second: float) -> float:
        return 100 - 90 * math.cos(2 * math.pi * second / 86400)

    day = 86400
    now = 2 * day + 6 * 3600  # six in the morning, two days in
    series = VersionSeries()
    for minute in range((now - 3600) // 60 - 2 * 24 * 60 + 60, (now - 3600) // 60):
        # Older history one record a minute (what matters is the per-minute count).
        series.add(rec(minute * 60, round(60 * rate(minute * 60))), now)
    for second in range(now - 3600, now):
        series.add(rec(second, round(rate(second))), now)
    signals = policy_input(WIDE, series, Replicas(ready=10, startup_time=1800), float(now))
    assert abs(signals.period - day) <= 120
    ahead = rate(now + 1800)
    assert signals.forecast_rate == pytest.approx(ahead, rel=0.1)
    assert signals.forecast_rate > signals.rate_stable * 1.08  # the rise is seen coming
