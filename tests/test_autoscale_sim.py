"""The autoscaling simulator and its baselines: deterministic, exact where it can be, and
showing the behaviours the benchmark is about (KPA's runaway, our steady-load calm)."""

from __future__ import annotations

import math

from loadtests import autoscale_sim as sim
from loadtests.autoscale_baselines import KnativeWindow
from loadtests.bench import autoscale
from loadtests.bench.cli import build_parser

SHORT_STEADY = sim.Trace("steady", "steady", 120, base=100.0)
BURST = sim.Trace("burst", "step", 90, base=5.0, high=200.0, at=20.0)


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    a = autoscale.run_all([BURST], seeds=[7], startups=(5,), limits=(1,), policies=("ours", "kpa"))
    b = autoscale.run_all([BURST], seeds=[7], startups=(5,), limits=(1,), policies=("ours", "kpa"))
    assert a == b
    # One process or two: the same numbers.
    one = autoscale.run_all([BURST], seeds=[7, 8], startups=(5,), limits=(1,), policies=("ours",))
    two = autoscale.run_all([BURST], [7, 8], (5,), (1,), ("ours",), jobs=2)
    assert one == two
    w7, w8 = sim.make_workload(BURST, 7), sim.make_workload(BURST, 8)
    assert w7 == sim.make_workload(BURST, 7)
    assert w7.arrivals != w8.arrivals


def test_every_request_is_served_and_counted() -> None:
    work = sim.make_workload(BURST, 1)
    result = sim.simulate(BURST, work, autoscale.factory_for("ours"), 5, 4)
    # The trace's requests, not the warm-up's (its history, simulated before t = 0).
    warmup = sum(1 for a in work.arrivals if a < 0)
    assert warmup > 0 and result.requests == len(work.arrivals) - warmup > 0
    assert math.isfinite(result.p99)  # nobody left in the queue
    assert 0 < result.misses < result.requests  # the step makes some wait


def test_the_oracle_costs_what_the_arithmetic_says_on_steady_load() -> None:
    # 100 rps x 50 ms = 5 busy slots; at 70%: ceil(7.14) = 8 replicas of limit 1 and
    # ceil(1.79) = 2 of limit 4, for the whole trace, and nothing more.
    for limit, replicas in ((1, 8), (4, 2)):
        assert sim.needed_replicas(100.0, limit) == replicas
        for startup in sim.STARTUPS:
            result = sim.simulate(
                SHORT_STEADY, sim.make_workload(SHORT_STEADY, 1), autoscale.factory_for("oracle"),
                startup, limit,
            )  # fmt: skip
            assert result.cost == replicas * SHORT_STEADY.duration
            assert result.direction_changes == 0 and result.peak == replicas


def test_faithful_kpa_runs_away_on_a_burst_with_the_concurrency_metric() -> None:
    # The backlog piling up during a 30 s start-up is counted as concurrency, and each
    # queued request asks for 1/0.7 of a replica: hundreds for a peak that needs 15.
    needed = sim.needed_peak(BURST, 1)
    assert needed == 15
    work = sim.make_workload(BURST, 1)
    kpa = sim.simulate(BURST, work, autoscale.factory_for("kpa"), 30, 1)
    capped = sim.simulate(BURST, work, autoscale.factory_for("kpa-max2x"), 30, 1)
    ours = sim.simulate(BURST, work, autoscale.factory_for("ours"), 30, 1)
    assert kpa.peak > 20 * needed
    assert capped.peak == 2 * needed
    assert ours.peak < kpa.peak / 10
    assert ours.cost < kpa.cost / 5


def test_our_policy_keeps_steady_load_steady() -> None:
    steady = next(t for t in sim.TRACES if t.name == "steady")
    for seed in sim.SEEDS:
        work = sim.make_workload(steady, seed)
        for startup in sim.STARTUPS:
            for limit in sim.LIMITS:
                result = sim.simulate(steady, work, autoscale.factory_for("ours"), startup, limit)
                assert result.direction_changes <= 2, (seed, startup, limit)
                assert result.misses == 0


def test_direction_changes_count_turns_only() -> None:
    assert sim.direction_changes([2, 2, 3, 5, 5, 4, 4, 6, 6]) == 2
    assert sim.direction_changes([1, 2, 3]) == 0


def test_knative_window_averages_only_the_written_span() -> None:
    # Values per second, indexed the way the simulator stores them.
    series = [0.0] * (sim.HISTORY_S + 100)
    window = KnativeWindow(60)
    for second in range(10, 16):  # six seconds of 6.0 after a long silence
        series[second + sim.HISTORY_S] = 6.0
        window.record(second, True)
    assert window.average(series, 16) == 6.0  # a partial window, not 36 / 60
    assert window.average(series, 16 + 60) == 0.0  # a whole window without a write
    window.record(20, True)  # a gap shorter than the window counts as zeros
    assert window.average(series, 21) == 36.0 / 11


def test_slo_ratio_treats_noise_level_shares_as_equal() -> None:
    assert autoscale.slo_ratio(0.0, 0.0) == 1.0
    assert autoscale.slo_ratio(0.0002, 0.0001) == 1.0
    assert autoscale.slo_ratio(0.02, 0.01) == 2.0


def test_bench_has_the_autoscale_subcommand() -> None:
    args = build_parser().parse_args(["autoscale", "--jobs", "1", "--trace", "steady"])
    assert args.trace == ["steady"] and args.jobs == 1 and callable(args.run)
