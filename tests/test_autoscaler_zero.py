"""Scale to zero in the policy, on a fake clock: activation from held requests, the
grace before zero for every metric, and never to zero while a replica is starting."""

from __future__ import annotations

from dataclasses import replace

from merlin_dp.autoscaler.policy import PolicyConfig, PolicyState, Signals, decide

ZERO = PolicyConfig(metrics_type="concurrency", target_value=2.0, min_replica=0, max_replica=10,
                    scale_to_zero_grace=30.0, scale_down_delay=10.0)  # fmt: skip


def test_requests_held_at_zero_start_enough_replicas_at_once() -> None:
    # Windows still read zero (the gateway poked before any second closed).
    d = decide(ZERO, Signals(waiting=5), PolicyState(desired=0, last_active=None), 100.0)
    assert d.desired == 3  # ceil(5 held / 2 per replica)
    assert d.state.last_active == 100.0
    # Capped by max_replica, at least one for any other metric.
    rps = PolicyConfig(metrics_type="rps", target_value=50.0, min_replica=0, max_replica=4)
    assert decide(rps, Signals(waiting=500), PolicyState(), 0.0).desired == 1
    cpu = PolicyConfig(metrics_type="cpu_utilization", target_value=60, min_replica=0)
    assert decide(cpu, Signals(waiting=1), PolicyState(), 0.0).desired == 1


def test_held_requests_do_not_matter_once_capacity_is_on_its_way() -> None:
    d = decide(ZERO, Signals(waiting=9, starting=1, panic=1), PolicyState(desired=1), 0.0)
    assert d.desired >= 1
    # A starting replica is never scaled away, even with no traffic at all.
    idle = decide(ZERO, Signals(starting=1), PolicyState(desired=1, last_active=-1000.0), 0.0)
    assert idle.desired == 1


def test_utilization_metrics_go_to_zero_after_the_grace_of_no_traffic() -> None:
    cpu = PolicyConfig(metrics_type="cpu_utilization", target_value=60, min_replica=0,
                       max_replica=4, scale_to_zero_grace=30.0)  # fmt: skip
    state = PolicyState(desired=2, last_active=0.0)
    busy = decide(cpu, Signals(utilization=60, ready=2, rate_panic=3.0), state, 10.0)
    assert busy.desired == 2 and busy.state.last_active == 10.0
    state = busy.state
    out = []
    for t in range(11, 50):
        # Memory/CPU of an idle replica is not zero: only the request traffic shows idleness.
        d = decide(cpu, Signals(utilization=60, ready=2, rate_panic=0.0), state, float(t))
        state = d.state
        out.append((t, d.desired))
    assert all(n == 2 for t, n in out if t < 40)
    assert all(n == 0 for t, n in out if t >= 40)
    # With min_replica 1 the same idleness keeps the HPA's answer.
    keep = replace(cpu, min_replica=1)
    d = decide(keep, Signals(utilization=60, ready=2), PolicyState(desired=2, last_active=0.0), 99)
    assert d.desired == 2
