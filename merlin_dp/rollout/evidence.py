"""Counting the gateways' per-second records into a rollout's evidence.

A second counts once, for the analysis of the phase it belongs to: while shadowing, the
baseline's answers to callers against the candidate's mirrored copies (and how the pairs
compared); on the canary steps, each version's answers to callers. Seconds before the
phase's ``count_from`` (the routing change still spreading to gateways) don't count.
"""

from __future__ import annotations

import math

from merlin_dp.spec.rollout import Evidence, RolloutStatus, Tally
from merlin_dp.spec.signals import SignalRecord, add_counts

# A second is counted once this many more have closed: every gateway has reported it by
# then (workers close seconds on a 50 ms ticker and push or are pulled once a second).
LAG_SECONDS = 2


def last_countable(now: float) -> int:
    """The newest second whose records are in by ``now``."""
    return math.floor(now) - 1 - LAG_SECONDS


def count_second(
    status: RolloutStatus,
    second: int,
    baseline: SignalRecord | None,
    candidate: SignalRecord | None,
) -> None:
    """Add one closed second of both versions (None: no record) to the phase's evidence."""
    if second <= status.counted_to or second < status.count_from or not status.active:
        return
    status.counted_to = second
    if status.phase == "shadow":
        _count(status.shadow, baseline, candidate, shadow=True)
    else:
        _count(status.live, baseline, candidate, shadow=False)


def _count(
    evidence: Evidence,
    baseline: SignalRecord | None,
    candidate: SignalRecord | None,
    *,
    shadow: bool,
) -> None:
    if baseline is not None:
        _add(evidence.baseline, baseline.get("answered", 0), baseline.get("errors", 0),
             baseline.get("latency"))  # fmt: skip
    if candidate is None:
        return
    if shadow:
        _add(evidence.candidate, candidate.get("shadow_answered", 0),
             candidate.get("shadow_errors", 0), candidate.get("shadow_latency"))  # fmt: skip
        evidence.compared += candidate.get("compared", 0)
        evidence.differed += candidate.get("differed", 0)
    else:
        _add(evidence.candidate, candidate.get("answered", 0), candidate.get("errors", 0),
             candidate.get("latency"))  # fmt: skip


def _add(tally: Tally, answered: int, errors: int, latency: list[int] | None) -> None:
    tally.answered += answered
    tally.errors += errors
    if latency:
        tally.latency = add_counts(tally.latency, latency)
