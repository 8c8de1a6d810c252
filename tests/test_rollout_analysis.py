"""The rollout's sequential tests (merlin_dp.rollout.analysis): what they decide on what
evidence, and that looking at the evidence often does not inflate false alarms."""

from __future__ import annotations

import math
import random

from merlin_dp.rollout.analysis import (
    judge,
    latency_bound,
    thresholds,
    two_sample_llr,
)
from merlin_dp.spec.rollout import Analysis, Evidence, Tally
from merlin_dp.spec.signals import LATENCY_BUCKETS

DEFAULT = Analysis()


def tally(answered: int, errors: int = 0, latency: list[int] | None = None) -> Tally:
    return Tally(answered=answered, errors=errors, latency=latency or [])


def verdicts(
    evidence: Evidence, analysis: Analysis = DEFAULT, shadow: bool = False
) -> dict[str, str]:
    return {t.metric: t.verdict for t in judge(evidence, analysis, shadow=shadow)}


def lognormal_histogram(n: int, median: float, sigma: float = 0.5) -> list[int]:
    """n answers spread over the gateway's buckets as a log-normal latency would be."""
    cdf = [0.5 * (1 + math.erf(math.log(b / median) / (sigma * math.sqrt(2))))
           for b in LATENCY_BUCKETS]  # fmt: skip
    shares = [cdf[0]] + [cdf[i] - cdf[i - 1] for i in range(1, len(cdf))] + [1 - cdf[-1]]
    return [round(n * s) for s in shares]


def test_one_unlucky_error_at_low_traffic_does_not_roll_back() -> None:
    # A minute at 1 req/s: the candidate's one error against the baseline's none.
    ev = Evidence(baseline=tally(60), candidate=tally(60, errors=1))
    assert verdicts(ev)["error_rate"] == "pending"
    ev = Evidence(baseline=tally(600), candidate=tally(600, errors=2))
    assert verdicts(ev)["error_rate"] == "pending"


def test_too_little_evidence_does_not_promote() -> None:
    # A hundred clean answers can't rule out a half-point rise in errors...
    assert verdicts(Evidence(baseline=tally(100), candidate=tally(100)))["error_rate"] == "pending"
    # ...twelve hundred can.
    assert verdicts(Evidence(baseline=tally(1200), candidate=tally(1200)))["error_rate"] == "pass"


def test_nothing_decides_below_min_samples() -> None:
    ev = Evidence(baseline=tally(20), candidate=tally(20, errors=20))
    assert verdicts(ev, Analysis(min_samples=50))["error_rate"] == "pending"
    assert verdicts(ev, Analysis(min_samples=10))["error_rate"] == "fail"


def test_a_clear_regression_fails() -> None:
    ev = Evidence(baseline=tally(300, errors=0), candidate=tally(300, errors=15))
    assert verdicts(ev)["error_rate"] == "fail"


def test_the_baselines_rate_is_estimated_from_both_versions() -> None:
    # 5 errors in 686 against the baseline's 0 in 686: taken at face value, the baseline
    # errs 0.07% (a Jeffreys estimate) and 5 is far above it; but at the 0.1% both may
    # well share, 5 of 1372 answers landing on one side is not rare. No rollback.
    llr = two_sample_llr(5, 686, 0, 686, margin=0.005, ratio=1.5)
    fail_at, _ = thresholds(DEFAULT)
    assert 0 < llr < fail_at


def test_the_ratio_margin_takes_over_for_a_baseline_that_errs_often() -> None:
    # At a 5% baseline, +0.5 points is noise; the test weighs 1.5x instead.
    same = two_sample_llr(50, 1000, 50, 1000, margin=0.005, ratio=1.5)
    worse = two_sample_llr(80, 1000, 50, 1000, margin=0.005, ratio=1.5)
    assert same < 0 < worse


def test_false_alarms_stay_under_alpha_when_looked_at_after_every_few_answers() -> None:
    """Candidate and baseline share a 2% error rate; the test is checked after every 5
    answers of each until it decides. Wald's bound: at most alpha of runs fail."""
    analysis = Analysis(alpha=0.05, beta=0.05, error_rate_margin=0.05, min_samples=5)
    rng = random.Random(2026)
    runs, failed = 400, 0
    for _ in range(runs):
        ev = Evidence()
        for _ in range(2000):
            for t in (ev.baseline, ev.candidate):
                t.answered += 5
                t.errors += sum(rng.random() < 0.02 for _ in range(5))
            verdict = verdicts(ev, analysis)["error_rate"]
            if verdict != "pending":
                failed += verdict == "fail"
                break
    assert failed <= analysis.alpha * runs, failed


def test_a_regression_at_twice_the_margin_is_caught() -> None:
    analysis = Analysis(alpha=0.05, beta=0.05, error_rate_margin=0.05, min_samples=5)
    rng = random.Random(7)
    caught = 0
    for _ in range(100):
        ev = Evidence()
        for _ in range(2000):
            ev.baseline.answered += 5
            ev.baseline.errors += sum(rng.random() < 0.02 for _ in range(5))
            ev.candidate.answered += 5
            ev.candidate.errors += sum(rng.random() < 0.12 for _ in range(5))
            verdict = verdicts(ev, analysis)["error_rate"]
            if verdict != "pending":
                caught += verdict == "fail"
                break
    assert caught >= 95


def test_the_latency_bound_sits_where_a_slowdown_shows() -> None:
    for median in (0.003, 0.02, 0.07, 0.4):
        hist = lognormal_histogram(10_000, median)
        bound = latency_bound(hist, DEFAULT)
        assert bound is not None
        i = LATENCY_BUCKETS.index(bound)
        above = sum(hist[i + 1 :]) / sum(hist)
        assert 0.15 <= above <= 0.85, (median, bound, above)
    # Every answer in one bucket: no bound shows a slowdown.
    assert latency_bound([0, 0, 0, 500] + [0] * 13, DEFAULT) is None


def test_latency_passes_a_twin_and_fails_a_slower_candidate() -> None:
    base = lognormal_histogram(2000, 0.03)
    twin = Evidence(baseline=tally(2000, latency=base), candidate=tally(2000, latency=base))
    assert verdicts(twin)["latency"] == "pass"
    slower = Evidence(baseline=tally(2000, latency=base),
                      candidate=tally(2000, latency=lognormal_histogram(2000, 0.039)))  # fmt: skip
    assert verdicts(slower)["latency"] == "fail"


def test_mismatch_is_judged_only_while_shadowing() -> None:
    ev = Evidence(baseline=tally(700), candidate=tally(700), compared=700, differed=0)
    assert verdicts(ev, shadow=True)["mismatch_rate"] == "pass"
    assert "mismatch_rate" not in verdicts(ev, shadow=False)
    ev = Evidence(baseline=tally(300), candidate=tally(300), compared=300, differed=9)
    assert verdicts(ev, shadow=True)["mismatch_rate"] == "fail"
    # Not compared: a retrained model is meant to answer differently.
    assert "mismatch_rate" not in verdicts(ev, Analysis(compare_predictions=False), shadow=True)


def test_a_passed_test_stays_passed() -> None:
    ev = Evidence(baseline=tally(1200), candidate=tally(1200))
    assert verdicts(ev)["error_rate"] == "pass"
    ev.candidate.errors += 4  # later errors don't reopen a test that stopped
    ev.candidate.answered += 100
    ev.baseline.answered += 100
    assert verdicts(ev)["error_rate"] == "pass"
