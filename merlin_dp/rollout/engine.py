"""A rollout's state machine: pure functions of its status and the time.

``begin`` makes the status for a plan and the rule in force; ``rule_for`` is the rule
each phase routes by (shadow: the rule as it was plus a mirror of all traffic to the
candidate; a canary step: baseline and candidate at the step's weights, in that order,
so stepping up moves only callers in the new share; promoted: the candidate alone, the
blue-green switch; rolled back or aborted: the rule as it was). ``decide`` reads the
evidence and says what to do next, ``carry_out`` records it once the controller has
routed it. The controller (:mod:`merlin_dp.controller.rollouts`) and the benchmark
(``loadtests/bench/rollout.py``) drive the same functions.

The phases: shadow until every test passes or one fails; then each canary step held at
least ``step_seconds``, and longer while a test is more than halfway (in log-likelihood
ratio) to failing without deciding; a failing test rolls back at once, in any phase. After the
last step the candidate is promoted; without a shadow phase, only once the live tests
have passed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merlin_dp.rollout.analysis import judge
from merlin_dp.spec.rollout import Action, Judgement, RolloutDecision, RolloutPlan, RolloutStatus
from merlin_dp.spec.rule import Destination, Mirror, Rule

DECISIONS_KEPT = 100
LIVE_ALPHA_SHARE = 0.1


class RolloutRefused(ValueError):
    """The rollout can't start on this rule (the message says why)."""


@dataclass(frozen=True, slots=True)
class Move:
    """What the analysis asks for: a canary step, a promotion or a rollback."""

    action: Action
    weight: int
    reason: str
    tests: tuple[Judgement, ...] = ()
    step: int = -1


def begin(project: str, model: str, plan: RolloutPlan, rule: Rule, now: float) -> RolloutStatus:
    """The status of a rollout about to start on ``rule``; refused unless the rule sends
    every weighted request to one version other than the candidate and mirrors nothing."""
    weighted = [d for d in rule.destinations if d.weight > 0]
    if len(weighted) != 1:
        split = ", ".join(f"{d.version} {d.weight}%" for d in weighted)
        raise RolloutRefused(
            f"a rollout starts from one version taking all traffic; the rule splits it "
            f"({split}): switch or set the weights first"
        )
    baseline = weighted[0].version
    if baseline == plan.candidate:
        raise RolloutRefused(f"version {baseline} already takes all traffic")
    if rule.mirror is not None:
        raise RolloutRefused(
            f"the rule already mirrors to version {rule.mirror.version}; remove the mirror first"
        )
    status = RolloutStatus(
        project=project, model=model, baseline=baseline, candidate=plan.candidate,
        plan=plan, phase="shadow" if plan.shadow else "canary", step=-1 if plan.shadow else 0,
        weight=0 if plan.shadow else plan.steps[0], started=now, step_started=now,
        rule_before=rule,
    )  # fmt: skip
    status.count_from = _first_counted(status, now)
    what = "shadowing all traffic" if plan.shadow else f"a canary at {status.weight}%"
    _record(status, Move("start", status.weight, f"started with {what}"), now, 0)
    return status


def rule_for(status: RolloutStatus) -> Rule:
    """The rule the rollout's phase routes by."""
    before = status.rule_before
    if status.phase in ("rolled_back", "aborted"):
        return before
    if status.phase == "shadow":
        mirror = Mirror(version=status.candidate, percent=100,
                        relative_tolerance=status.plan.relative_tolerance)  # fmt: skip
        return before.model_copy(update={"mirror": mirror})
    if status.phase == "promoted":
        destinations = [Destination(version=status.candidate, weight=100)]
    else:
        destinations = [Destination(version=status.baseline, weight=100 - status.weight),
                        Destination(version=status.candidate, weight=status.weight)]  # fmt: skip
    return before.model_copy(update={"destinations": destinations, "mirror": None})


def decide(status: RolloutStatus, now: float) -> Move | None:
    """What the evidence asks for now; None: keep going as it is."""
    if not status.active:
        return None
    shadow = status.phase == "shadow"
    analysis = status.plan.analysis
    if not shadow and status.plan.shadow:
        # A candidate that passed the shadow is watched on live traffic with a tenth of
        # the false-alarm budget: a second full test would double its false rollbacks.
        analysis = analysis.model_copy(update={"alpha": analysis.alpha * LIVE_ALPHA_SHARE})
    tests = judge(status.shadow if shadow else status.live, analysis, shadow=shadow)
    status.tests = tests
    failed = [t for t in tests if t.verdict == "fail"]
    if failed:
        where = "shadow" if shadow else f"canary at {status.weight}%"
        return Move("rollback", 0, f"{where}: " + "; ".join(map(describe, failed)), tuple(tests))
    if status.paused:
        return None
    if shadow:
        if all(t.verdict == "pass" for t in tests) and _judged(tests):
            return _next(status, "shadow passed: " + "; ".join(map(describe, tests)), tests)
        return None
    if now - status.step_started < status.plan.step_seconds:
        return None
    leaning = [t for t in tests if t.verdict == "pending" and t.llr > t.fail_at / 2]
    if leaning:
        return None  # more than halfway to a rollback: hold until the test decides
    last = status.step >= len(status.plan.steps) - 1
    passed = all(t.verdict == "pass" for t in tests) and _judged(tests)
    if last and not status.plan.shadow and not passed:
        return None
    held = f"{status.weight}% held {now - status.step_started:.0f}s"
    summary = "; ".join(map(describe, tests)) or "no answers counted"
    return _next(status, f"{held}: {summary}", tests)


def carry_out(status: RolloutStatus, move: Move, now: float, revision: int) -> None:
    """Record a move the controller has routed (``revision`` carries it)."""
    if move.action == "rollback":
        status.phase = "rolled_back"
        status.finished = now
    elif move.action == "promote":
        status.phase = "promoted"
        status.finished = now
    elif move.action == "step":
        if status.phase == "shadow":
            status.phase = "canary"
        status.step = move.step
        status.step_started = now
        status.count_from = _first_counted(status, now)
    status.weight = move.weight
    status.message = move.reason
    _record(status, move, now, revision)


def pause(status: RolloutStatus, reason: str, now: float) -> None:
    status.paused = True
    status.message = reason
    _record(status, Move("pause", status.weight, reason), now, 0)


def resume(status: RolloutStatus, now: float) -> None:
    status.paused = False
    status.message = "resumed"
    _record(status, Move("resume", status.weight, "resumed"), now, 0)


def abort(status: RolloutStatus, reason: str, now: float, revision: int) -> None:
    status.phase = "aborted"
    status.finished = now
    status.weight = 0
    status.message = reason
    _record(status, Move("abort", 0, reason), now, revision)


def describe(test: Judgement) -> str:
    """One test in words, with its numbers."""
    pct = _percent
    if test.metric == "latency":
        what = (f"latency: {pct(test.candidate)} of the candidate's answers above the "
                f"bound against the baseline's {pct(test.baseline)}, a slowdown would be "
                f"{pct(test.margin)}")  # fmt: skip
    elif test.metric == "error_rate":
        what = (f"error rate: {pct(test.candidate)} against the baseline's "
                f"{pct(test.baseline)}, a regression would be {pct(test.margin)}")  # fmt: skip
    else:
        what = (f"mismatch rate: {pct(test.candidate)} of pairs differed, allowed "
                f"{pct(test.baseline)}, a regression would be {pct(test.margin)}")  # fmt: skip
    return (f"{what} ({test.samples} answers, log-likelihood ratio {test.llr:g}, "
            f"fails at {test.fail_at:g}, passes at {test.pass_at:g}: {test.verdict})")  # fmt: skip


def _next(status: RolloutStatus, reason: str, tests: list[Judgement]) -> Move:
    step = status.step + 1
    if step < len(status.plan.steps):
        weight = status.plan.steps[step]
        return Move("step", weight, reason, tuple(tests), step)
    return Move("promote", 100, reason, tuple(tests))


def _judged(tests: list[Judgement]) -> bool:
    return any(t.metric == "error_rate" for t in tests)


def _first_counted(status: RolloutStatus, now: float) -> int:
    return math.floor(now + status.plan.analysis.settle_seconds) + 1


def _record(status: RolloutStatus, move: Move, now: float, revision: int) -> None:
    status.decisions.append(RolloutDecision(
        at=now, action=move.action, weight=move.weight, reason=move.reason,
        tests=list(move.tests), revision=revision,
    ))  # fmt: skip
    del status.decisions[:-DECISIONS_KEPT]


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"
