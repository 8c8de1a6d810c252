"""Windowed averages on injected time."""

from __future__ import annotations

from merlin_dp.autoscaler.window import SecondBuckets


def test_average_over_complete_seconds_with_silence_as_zero() -> None:
    b = SecondBuckets(horizon_s=60)
    for second in range(100, 110):
        b.add(second, 10.0, now=second + 0.5)
    assert b.average(110.2, 6) == 10.0  # seconds 104..109
    assert b.average(113.0, 6) == 5.0  # 107..109 full, 110..112 silent
    assert b.average(200.0, 60) == 0.0


def test_several_sources_add_into_one_second() -> None:
    b = SecondBuckets(horizon_s=10)
    b.add(5, 3.0, now=5.9)
    b.add(5, 4.0, now=5.9)  # a second gateway
    assert b.average(6.0, 1) == 7.0


def test_freshness_and_bounded_memory() -> None:
    b = SecondBuckets(horizon_s=10)
    assert not b.fresh(0, 3)
    for second in range(1000):
        b.add(second, 1.0, now=second)
    assert b.fresh(999.5, 3) and not b.fresh(1010, 3)
    assert len(b._values) <= 21
