"""The sequential tests a rollout is judged by: pure functions of the evidence so far.

Each metric gets Wald's sequential probability ratio test (SPRT): the log-likelihood
ratio of "the candidate is worse by the margin" over "the candidate is as good as the
baseline", recomputed from the cumulative counts whenever the evidence grows. It fails at
``log((1 - beta) / alpha)`` and passes at ``log(beta / (1 - alpha))``; Wald's bounds hold
however often it is looked at, so checking every second costs no false alarms, and no
test can pass or fail on fewer than ``min_samples`` answers of either version. Why SPRT,
and what each margin means: docs/rollouts.md.

- ``error_rate``: the candidate's answers, each a server error or not, against the
  baseline's rate over the same seconds (a Jeffreys estimate, so a baseline with no
  error yet is not taken to have none) and that rate plus the margin.
- ``latency``: the share of answers slower than a bound chosen from the baseline's
  histogram (where a slowdown moves the most answers across it), candidate against
  baseline: a two-sample test on the difference of the shares, against the difference a
  ``latency_slowdown`` would make.
- ``mismatch_rate`` (shadowing only): compared answer pairs that differed, against the
  allowed share and that plus the margin.

A test that passed stays passed (an SPRT stops at its first crossing); one that fails
ends the rollout.
"""

from __future__ import annotations

import math

from merlin_dp.spec.rollout import Analysis, Evidence, Judgement, Verdict
from merlin_dp.spec.signals import LATENCY_BUCKETS

# The latency bound is one with this share of the baseline's answers above it.
SHARE_RANGE = (0.15, 0.85)
# The least shift in that share the latency test weighs against.
MIN_SHIFT = 0.02
# Baseline answers seen before the bound is chosen (and then kept).
BOUND_SAMPLES = 200


def thresholds(analysis: Analysis) -> tuple[float, float]:
    """(fail at, pass at): Wald's bounds on the log-likelihood ratio."""
    a, b = analysis.alpha, analysis.beta
    return math.log((1 - b) / a), math.log(b / (1 - a))


def judge(evidence: Evidence, analysis: Analysis, *, shadow: bool) -> list[Judgement]:
    """Every test of one analysis as it stands; chooses the latency bound when due."""
    if evidence.latency_bound is None and evidence.baseline.answered >= max(
        analysis.min_samples, BOUND_SAMPLES
    ):
        evidence.latency_bound = latency_bound(evidence.baseline.latency, analysis)
    tests = [error_rate(evidence, analysis)]
    if evidence.latency_bound is not None:
        tests.append(latency(evidence, analysis, evidence.latency_bound))
    if shadow and analysis.compare_predictions:
        tests.append(mismatch_rate(evidence, analysis, analysis.mismatch_rate_allowed))
    for i, test in enumerate(tests):
        if test.metric in evidence.passed:
            tests[i] = test.model_copy(update={"verdict": "pass"})
        elif test.verdict == "pass":
            evidence.passed.append(test.metric)
    return tests


def error_rate(evidence: Evidence, analysis: Analysis) -> Judgement:
    base, cand = evidence.baseline, evidence.candidate
    margin, ratio = analysis.error_rate_margin, analysis.error_rate_ratio
    llr = two_sample_llr(cand.errors, cand.answered, base.errors, base.answered, margin, ratio)
    pb = rate(base.errors, base.answered)
    return _judgement("error_rate", analysis, pb, rate(cand.errors, cand.answered),
                      max(pb + margin, pb * ratio), cand.answered,
                      min(base.answered, cand.answered), llr)  # fmt: skip


def mismatch_rate(evidence: Evidence, analysis: Analysis, allowed: float) -> Judgement:
    n, k = evidence.compared, evidence.differed
    m1 = min(allowed + analysis.mismatch_rate_margin, 0.999)
    llr = bernoulli_llr(k, n, allowed, m1)
    return _judgement("mismatch_rate", analysis, allowed, rate(k, n), m1, n, n, llr)


def latency(evidence: Evidence, analysis: Analysis, bound: float) -> Judgement:
    base, cand = evidence.baseline, evidence.candidate
    i = LATENCY_BUCKETS.index(bound)
    nb, nc = sum(base.latency), sum(cand.latency)
    kb, kc = above(base.latency, i), above(cand.latency, i)
    delta = max(moved(base.latency, i, analysis.latency_slowdown), MIN_SHIFT)
    llr = two_sample_llr(kc, nc, kb, nb, delta, beyond=False)
    qb = rate(kb, nb)
    return _judgement("latency", analysis, qb, rate(kc, nc), qb + delta, nc, min(nb, nc), llr)


def latency_bound(histogram: list[int], analysis: Analysis) -> float | None:
    """The bucket bound where a slowdown of ``latency_slowdown`` is easiest to see: the
    most answers moved across it for the spread of the share above it, among bounds
    with a fair share on either side (in a thin tail, a bucket's answers bunch at its
    low end and the shift can't be told from the histogram)."""
    n = sum(histogram)
    if not n:
        return None
    best, best_score = None, 0.0
    for i in range(1, len(LATENCY_BUCKETS) - 1):
        share = above(histogram, i) / n
        if not SHARE_RANGE[0] <= share <= SHARE_RANGE[1]:
            continue
        shift = moved(histogram, i, analysis.latency_slowdown)
        middle = share + shift / 2
        score = shift * shift / (middle * (1 - middle))
        if score > best_score:
            best, best_score = LATENCY_BUCKETS[i], score
    return best


def moved(histogram: list[int], i: int, slowdown: float) -> float:
    """The share of answers a slowdown would push over bound ``i``: the density in log
    time at the bound (the mean of the two buckets' either side of it) times the
    slowdown's log."""
    n = sum(histogram)
    if not n:
        return 0.0
    below = _count_at(histogram, i) / n / math.log(LATENCY_BUCKETS[i] / LATENCY_BUCKETS[i - 1])
    over = _count_at(histogram, i + 1) / n / math.log(LATENCY_BUCKETS[i + 1] / LATENCY_BUCKETS[i])
    return min((below + over) / 2 * math.log(slowdown), 1.0)


def two_sample_llr(
    kc: int, nc: int, kb: int, nb: int, margin: float, ratio: float = 1.0, *, beyond: bool = True
) -> float:
    """Log of the generalized likelihood ratio of "the candidate is worse: where the
    baseline's rate is p, the candidate's is at least max(p + margin, p * ratio)" over
    "the candidate is no worse than the baseline", each at its likeliest rates given both
    versions' counts (``kc`` of ``nc``, ``kb`` of ``nb``). The baseline's rate is not
    known: under either hypothesis the candidate's answers say as much about it as the
    baseline's own, so a baseline that happened to err less than usual does not make the
    candidate's few errors look like a regression.

    ``beyond``: "worse" takes in every rate past the margin, so a regression far beyond
    it shows at once (server errors: rare events, where the margin's own model fits a
    large regression about as badly as "no worse" does); otherwise it is the margin
    exactly, Wald's simple alternative, whose false alarms stay within alpha (latency
    shares, which are never rare)."""
    if not nc or not nb:
        return 0.0
    pc, pb = kc / nc, kb / nb
    free = _loglik(kc, nc, pc) + _loglik(kb, nb, pb)
    # No worse: the counts as they are, or else both at one rate.
    no_worse = free if pc <= pb else _loglik(kc + kb, nc + nb, (kc + kb) / (nc + nb))
    if beyond and pc >= max(pb + margin, pb * ratio):
        return free - no_worse
    # Worse by the margin, at the likeliest p on its edge: p + margin below the kink,
    # p * ratio above it (both below 1).
    eps = 1e-12
    top = (1 - margin) if ratio <= 1 else min(1 - margin, 1 / ratio)
    kink = margin / (ratio - 1) if ratio > 1 else 1.0
    worse = _best_on_piece(kc, nc, kb, nb, 1.0, margin, 0.0, min(kink, top) - eps)
    if ratio > 1 and kink < 1 / ratio:
        worse = max(worse, _best_on_piece(kc, nc, kb, nb, ratio, 0.0, kink, 1 / ratio - eps))
    return worse - no_worse


def bernoulli_llr(k: int, n: int, p0: float, p1: float) -> float:
    """log P(k of n | p1) / P(k of n | p0)."""
    return _loglik(k, n, p1) - _loglik(k, n, p0)


def _best_on_piece(
    kc: int, nc: int, kb: int, nb: int, a: float, c: float, lo: float, hi: float
) -> float:
    """max over p in [lo, hi] of the log-likelihood with the candidate at a*p + c: it is
    concave there, so its slope is found by bisection."""
    if hi <= lo:
        return -math.inf

    def slope(p: float) -> float:
        h = a * p + c
        d = 0.0
        if kc:
            d += kc * a / h
        if nc - kc:
            d -= (nc - kc) * a / (1 - h)
        if kb:
            d += kb / p
        if nb - kb:
            d -= (nb - kb) / (1 - p)
        return d

    left, right = max(lo, 1e-12), hi
    if slope(left) <= 0:
        p = left
    elif slope(right) >= 0:
        p = right
    else:
        for _ in range(60):
            mid = (left + right) / 2
            if slope(mid) > 0:
                left = mid
            else:
                right = mid
        p = (left + right) / 2
    return _loglik(kc, nc, a * p + c) + _loglik(kb, nb, p)


def _loglik(k: int, n: int, p: float) -> float:
    """log p^k (1-p)^(n-k), with 0 log 0 = 0."""
    value = 0.0
    if k:
        value += k * math.log(p) if p > 0 else -math.inf
    if n - k:
        value += (n - k) * math.log(1 - p) if p < 1 else -math.inf
    return value


def rate(k: int, n: int) -> float:
    return k / n if n else 0.0


def above(histogram: list[int], i: int) -> int:
    """Answers slower than ``LATENCY_BUCKETS[i]``."""
    return sum(histogram[i + 1 :])


def _count_at(histogram: list[int], i: int) -> int:
    return histogram[i] if i < len(histogram) else 0


def _judgement(
    metric: str,
    analysis: Analysis,
    baseline: float,
    candidate: float,
    margin: float,
    samples: int,
    least: int,
    llr: float,
) -> Judgement:
    fail_at, pass_at = thresholds(analysis)
    verdict: Verdict = "pending"
    if least >= analysis.min_samples:
        verdict = "fail" if llr >= fail_at else "pass" if llr <= pass_at else "pending"
    return Judgement(
        metric=metric,  # type: ignore[arg-type]
        baseline=round(baseline, 6), candidate=round(candidate, 6), margin=round(margin, 6),
        samples=samples, llr=round(llr, 3), fail_at=round(fail_at, 3),
        pass_at=round(pass_at, 3), verdict=verdict,
    )  # fmt: skip
