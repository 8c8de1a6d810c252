"""Simulated rollouts: this project's analysis and Flagger's default one, on the same
simulated traffic, seeded and deterministic.

``python -m loadtests.bench rollout`` runs it (:mod:`loadtests.bench.rollout`). Nothing
here reads a clock: simulated time is the only time.

The model
---------

- **Traffic**: Poisson arrivals at 1, 10 or 100 requests/s.
- **The baseline** answers with a server error 0.1% of the time, independently, and takes
  a log-normal time with sigma 0.5 around a median drawn per run, log-uniformly between 5
  and 200 ms (so the latency histogram's bucket bounds fall anywhere on it).
- **Candidates** (:data:`CANDIDATES`): ``good`` behaves exactly like the baseline; bad ones
  add 1 or 5 points of server errors, are 30% slower (every answer's time times 1.3), or
  answer 2% of requests with a different prediction (a body only comparison can see).
- **The gateway** routes each second by the rule in force: a mirror copies every request
  to the candidate; weights send each request to the candidate with its share. Each
  second it emits the records a real gateway emits (``merlin_dp/spec/signals.py``), from
  its own draws: answers, server errors, the latency histogram over the gateway's
  buckets, and for the mirrored candidate its copies' and how each pair compared (a pair
  where either side erred is an error, not a comparison). Nothing else reaches the
  analysis: not the candidate's kind, rates or median.

This project (:func:`run_ours`) is the controller's own code: ``begin``, ``rule_for``,
``decide`` and ``carry_out`` of :mod:`merlin_dp.rollout.engine` with the default
:class:`~merlin_dp.spec.rollout.RolloutPlan`, a tick every second counting the seconds
production's driver would count by then (``last_countable``: two seconds of lag), a
routing change taking effect from the next second.

Flagger (:func:`run_flagger`) is its default canary analysis as its scheduler runs it
(fluxcd/flagger ``pkg/controller/scheduler.go``): a tick every ``interval`` (1 min); the
first tick after detection only initializes, the next sets weight 10 with no metric check;
every later tick first rolls back if failed checks reached ``threshold`` (5), then runs
the checks over the last minute of the canary's traffic — request-success-rate >= 99%
(non-5xx over all; no traffic is NaN, which fails) and request-duration p99 <= 500 ms
(Prometheus' ``histogram_quantile`` over the same buckets, whole milliseconds) — and on a
failure adds a failed check (never reset) and holds the weight; on success adds
``stepWeight`` (10) up to ``maxWeight`` (50); a success at 50 promotes (copies the spec to
the primary), and the next tick routes all traffic to it. No shadow.

Measured per run: promoted, rolled back or undecided within the hour; when; and the
requests the candidate answered to callers within the first hour (a promoted candidate
answers all of them from its promotion on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from merlin_dp.rollout.engine import begin, carry_out, decide
from merlin_dp.rollout.evidence import count_second, last_countable
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.rule import Destination, Rule
from merlin_dp.spec.signals import LATENCY_BUCKETS, SignalRecord

RATES = (1, 10, 100)
HORIZON_S = 3600
BASE_ERROR = 0.001
SIGMA = 0.5
MEDIAN_RANGE_S = (0.005, 0.2)


@dataclass(frozen=True)
class Candidate:
    name: str
    error: float = BASE_ERROR
    slowdown: float = 1.0
    differ: float = 0.0

    @property
    def bad(self) -> bool:
        return self.name != "good"


CANDIDATES = (
    Candidate("good"),
    Candidate("errors+1%", error=BASE_ERROR + 0.01),
    Candidate("errors+5%", error=BASE_ERROR + 0.05),
    Candidate("latency+30%", slowdown=1.3),
    Candidate("predictions-2%", differ=0.02),
)


@dataclass(frozen=True)
class Outcome:
    result: str  # promoted | rolled_back | undecided
    at: float  # seconds from the start (the horizon when undecided)
    exposure: float  # requests the candidate answered to callers in the hour
    reason: str = ""
    shadow_s: float = 0.0  # how long the shadow phase lasted
    first_reason: str = ""  # the first decision's


class World:
    """One run's traffic and versions; every draw from one seeded generator."""

    def __init__(self, rate: float, candidate: Candidate, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.rate = rate
        self.candidate = candidate
        low, high = MEDIAN_RANGE_S
        self.median = math.exp(self.rng.uniform(math.log(low), math.log(high)))
        self.base_buckets = _bucket_probabilities(self.median)
        self.cand_buckets = _bucket_probabilities(self.median * candidate.slowdown)

    def second(
        self, second: int, weight: int, mirror: bool
    ) -> tuple[SignalRecord, SignalRecord, int]:
        """One second's records (baseline, candidate) and the candidate's answers to
        callers."""
        rng, cand = self.rng, self.candidate
        n = int(rng.poisson(self.rate))
        to_candidate = int(rng.binomial(n, weight / 100)) if weight else 0
        to_baseline = n - to_candidate
        base_errors = int(rng.binomial(to_baseline, BASE_ERROR))
        base = _record(second, to_baseline, base_errors,
                       rng.multinomial(to_baseline, self.base_buckets))  # fmt: skip
        errors = int(rng.binomial(to_candidate, cand.error))
        mine = _record(second, to_candidate, errors,
                       rng.multinomial(to_candidate, self.cand_buckets))  # fmt: skip
        if mirror and to_baseline:
            copy_errors = int(rng.binomial(to_baseline, cand.error))
            both = 0
            if base_errors and copy_errors:
                both = int(rng.hypergeometric(base_errors, to_baseline - base_errors,
                                              copy_errors))  # fmt: skip
            clean = to_baseline - base_errors - copy_errors + both
            mine["shadow_answered"] = to_baseline
            mine["shadow_errors"] = copy_errors
            mine["shadow_latency"] = [
                int(c) for c in rng.multinomial(to_baseline, self.cand_buckets)
            ]
            mine["compared"] = clean
            mine["differed"] = int(rng.binomial(clean, cand.differ)) if cand.differ else 0
        return base, mine, to_candidate


def default_plan(candidate: str = "2") -> RolloutPlan:
    return RolloutPlan(candidate=candidate)


def run_ours(rate: float, candidate: Candidate, seed: int, plan: RolloutPlan) -> Outcome:
    world = World(rate, candidate, seed)
    rule = Rule(destinations=[Destination(version="1", weight=100)])
    status = begin("sim", "model", plan, rule, 0.0)
    records: dict[int, tuple[SignalRecord, SignalRecord]] = {}
    exposure = 0
    shadow_s, first = 0.0, ""
    for second in range(HORIZON_S):
        weight = status.weight if status.phase == "canary" else 0
        base, mine, served = world.second(second, weight, status.phase == "shadow")
        records[second] = (base, mine)
        exposure += served
        now = float(second + 1)
        for s in range(status.counted_to + 1, last_countable(now) + 1):
            pair = records.pop(s, None)
            if pair is not None:
                count_second(status, s, *pair)
        move = decide(status, now)
        if move is None:
            continue
        if status.phase == "shadow":
            shadow_s, first = now, move.reason
        carry_out(status, move, now, 0)
        if move.action == "promote":
            return Outcome("promoted", now, exposure + rate * (HORIZON_S - now), move.reason,
                           shadow_s, first)  # fmt: skip
        if move.action == "rollback":
            return Outcome("rolled_back", now, exposure, move.reason, shadow_s, first)
    return Outcome("undecided", HORIZON_S, exposure, _where(status), shadow_s, first)


# --- Flagger's default canary analysis ------------------------------------------------

FLAGGER_INTERVAL_S = 60
FLAGGER_THRESHOLD = 5
FLAGGER_STEP = 10
FLAGGER_MAX = 50
FLAGGER_MIN_SUCCESS = 99.0  # percent
FLAGGER_MAX_P99_MS = 500


def run_flagger(rate: float, candidate: Candidate, seed: int) -> Outcome:
    world = World(rate, candidate, seed)
    weight, failed, tick = 0, 0, 0
    promoting = False
    window: list[SignalRecord] = []
    exposure = 0
    for second in range(HORIZON_S):
        if second % FLAGGER_INTERVAL_S == 0:
            tick = second // FLAGGER_INTERVAL_S
            if promoting:
                # All traffic to the primary, which now runs the candidate's spec.
                return Outcome("promoted", second, exposure + rate * (HORIZON_S - second))
            if tick == 1:
                weight = FLAGGER_STEP  # "Starting canary analysis": no metrics yet
            elif tick > 1:
                if failed >= FLAGGER_THRESHOLD:
                    return Outcome("rolled_back", second, exposure,
                                   f"{failed} failed checks")  # fmt: skip
                if not flagger_checks(window[-FLAGGER_INTERVAL_S:]):
                    failed += 1
                elif weight < FLAGGER_MAX:
                    weight += FLAGGER_STEP
                else:
                    promoting = True  # the spec is copied to the primary
        _, mine, served = world.second(second, weight, False)
        window.append(mine)
        del window[:-FLAGGER_INTERVAL_S]
        exposure += served
    return Outcome("undecided", HORIZON_S, exposure, f"weight {weight}, {failed} failed")


def flagger_checks(window: list[SignalRecord]) -> bool:
    """request-success-rate >= 99 and request-duration (p99) <= 500 ms over the window."""
    total = sum(r.get("answered", 0) for r in window)
    if not total:
        return False  # no values found: the check fails
    errors = sum(r.get("errors", 0) for r in window)
    if 100.0 * (total - errors) / total < FLAGGER_MIN_SUCCESS:
        return False
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for r in window:
        for i, n in enumerate(r.get("latency", ())):
            buckets[i] += n
    return int(histogram_quantile(0.99, buckets) * 1000) <= FLAGGER_MAX_P99_MS


def histogram_quantile(q: float, buckets: list[int]) -> float:
    """Prometheus' histogram_quantile over per-bucket counts: linear within the bucket,
    the highest finite bound for the +Inf bucket, the first bucket from 0."""
    total = sum(buckets)
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if seen + n >= rank and n:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS[-1]


# --- helpers --------------------------------------------------------------------------


def _bucket_probabilities(median: float) -> list[float]:
    cdf = [0.5 * (1 + math.erf(math.log(b / median) / (SIGMA * math.sqrt(2))))
           for b in LATENCY_BUCKETS]  # fmt: skip
    probs = [cdf[0]] + [cdf[i] - cdf[i - 1] for i in range(1, len(cdf))] + [1 - cdf[-1]]
    return [max(p, 0.0) for p in probs]


def _record(second: int, answered: int, errors: int, latency: np.ndarray) -> SignalRecord:
    record: SignalRecord = {
        "project": "sim", "model": "model", "version": "", "second": second,
        "requests": answered, "concurrency": 0.0, "in_service": 0.0, "queued": 0.0,
        "completions": answered, "service_seconds": 0.0,
    }  # fmt: skip
    if answered:
        record["answered"] = answered
        record["errors"] = errors
        record["latency"] = [int(c) for c in latency]
    return record


def _where(status: RolloutStatus) -> str:
    tests = ", ".join(f"{t.metric} {t.verdict} ({t.llr:g})" for t in status.tests)
    return f"{status.phase} at {status.weight}%: {tests}"
