"""The rollout's state machine (merlin_dp.rollout.engine) and the rules it routes by, the
latter compiled by the gateway's own routing table."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from merlin_dp.gateway.metrics import VersionStats
from merlin_dp.gateway.pool.upstream import PoolLimits, UpstreamRegistry
from merlin_dp.gateway.routing.table import ModelTarget, compile_table
from merlin_dp.rollout.engine import RolloutRefused, begin, carry_out, decide, rule_for
from merlin_dp.rollout.evidence import count_second, last_countable
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.routes import RouteTableSpec
from merlin_dp.spec.rule import Rule
from merlin_dp.spec.signals import SignalRecord

BASELINE_RULE = Rule.model_validate(
    {"destinations": [{"version": "1", "weight": 100}], "sticky": {"header": "X-User"}}
)
FAST = {"step_seconds": 10,
        "analysis": {"min_samples": 20, "error_rate_margin": 0.05, "mismatch_rate_margin": 0.05,
                     "settle_seconds": 0}}  # fmt: skip


def plan(**over: Any) -> RolloutPlan:
    return RolloutPlan.model_validate({"candidate": "2", **FAST, **over})


def record(version: str, second: int, answered: int, errors: int = 0, **extra: Any) -> SignalRecord:
    rec: SignalRecord = {
        "project": "fraud", "model": "scorer", "version": version, "second": second,
        "requests": answered, "concurrency": 0.0, "in_service": 0.0, "queued": 0.0,
        "completions": answered, "service_seconds": 0.0,
    }  # fmt: skip
    if answered:
        rec.update({"answered": answered, "errors": errors, "latency": [0, 0, 0, 0, answered]})
    rec.update(extra)  # type: ignore[typeddict-item]
    return rec


def feed(status: RolloutStatus, now: float, per_second: int = 20, cand_errors: int = 0) -> None:
    """The gateways' records up to ``now`` as the driver counts them."""
    for s in range(status.counted_to + 1, last_countable(now) + 1):
        if status.phase == "shadow":
            cand = record("2", s, 0, shadow_answered=per_second, shadow_errors=cand_errors,
                          shadow_latency=[0, 0, 0, 0, per_second], compared=per_second,
                          differed=0)  # fmt: skip
        else:
            share = max(1, per_second * status.weight // 100)
            cand = record("2", s, share, cand_errors)
        count_second(status, s, record("1", s, per_second), cand)


def run(status: RolloutStatus, until: float, **traffic: Any) -> list[str]:
    """Tick once a second to ``until``: the moves made."""
    moves = []
    now = status.started
    while now < until and status.active:
        now += 1
        feed(status, now, **traffic)
        move = decide(status, now)
        if move is not None:
            carry_out(status, move, now, 0)
            moves.append(f"{move.action} {move.weight}")
    return moves


def test_a_rollout_starts_from_one_version_taking_all_traffic() -> None:
    split = Rule.model_validate({"destinations": [{"version": "1", "weight": 90},
                                                  {"version": "3", "weight": 10}]})  # fmt: skip
    with pytest.raises(RolloutRefused, match="splits it"):
        begin("fraud", "scorer", plan(), split, 0.0)
    mirrored = Rule.model_validate(
        {**BASELINE_RULE.model_dump(), "mirror": {"version": "3", "percent": 5}}
    )
    with pytest.raises(RolloutRefused, match="already mirrors"):
        begin("fraud", "scorer", plan(), mirrored, 0.0)
    with pytest.raises(RolloutRefused, match="already takes all traffic"):
        begin("fraud", "scorer", plan(candidate="1"), BASELINE_RULE, 0.0)


def test_a_plan_is_checked_whole() -> None:
    with pytest.raises(ValueError, match="does not rise"):
        plan(steps=[5, 5])
    with pytest.raises(ValueError, match="not a canary weight"):
        plan(steps=[100])
    with pytest.raises(ValueError, match="judge nothing"):
        plan(shadow=False, steps=[])


def test_a_good_candidate_goes_through_every_step_then_promotes() -> None:
    status = begin("fraud", "scorer", plan(steps=[10, 50]), BASELINE_RULE, 1000.0)
    assert status.phase == "shadow" and rule_for(status).mirror is not None
    moves = run(status, 1200.0)
    assert moves == ["step 10", "step 50", "promote 100"], status.decisions
    assert not status.active and status.finished is not None
    steps = [d for d in status.decisions if d.action == "step"]
    # Each canary step is held at least step_seconds.
    assert steps[1].at - steps[0].at >= 10
    assert rule_for(status).destinations[0].version == "2"


def test_a_failing_candidate_is_rolled_back_in_the_shadow() -> None:
    status = begin("fraud", "scorer", plan(), BASELINE_RULE, 1000.0)
    moves = run(status, 1300.0, cand_errors=4)  # 20% server errors
    assert moves == ["rollback 0"]
    assert "error rate" in status.message
    assert rule_for(status) == BASELINE_RULE


def test_without_shadow_the_live_tests_must_pass_before_promotion() -> None:
    # The default margin: some 900 clean answers to pass, 90 s of 10 a second.
    default = plan(shadow=False, steps=[50], analysis={"min_samples": 20, "settle_seconds": 0})
    status = begin("fraud", "scorer", default, BASELINE_RULE, 1000.0)
    assert status.phase == "canary" and status.weight == 50
    moves = run(status, 1012.0)
    assert moves == []  # held: step_seconds passed, the live evidence has not decided
    moves = run(status, 1400.0)
    assert moves == ["promote 100"]
    assert all(t.verdict == "pass" for t in status.decisions[-1].tests)


def test_a_paused_rollout_holds_but_still_rolls_back() -> None:
    from merlin_dp.rollout.engine import pause

    status = begin("fraud", "scorer", plan(steps=[50]), BASELINE_RULE, 1000.0)
    pause(status, "paused by test", 1000.0)
    assert run(status, 1400.0) == []  # the shadow passed, and the rollout held
    assert status.phase == "shadow" and status.tests
    status = begin("fraud", "scorer", plan(steps=[50]), BASELINE_RULE, 1000.0)
    pause(status, "paused by test", 1000.0)
    assert run(status, 1400.0, cand_errors=5) == ["rollback 0"]


def test_stepping_up_moves_only_callers_in_the_new_share() -> None:
    """The rules each step routes by, compiled by the gateway: a sticky caller on the
    candidate stays there; of the baseline's, only the step's new share moves."""
    status = begin("fraud", "scorer", plan(steps=[20, 50]), BASELINE_RULE, 1000.0)

    def versions_at(weight: int) -> dict[str, str]:
        status.phase, status.weight = "canary", weight
        spec = RouteTableSpec.model_validate({
            "revision": 1,
            "version_endpoints": [{"project": "fraud", "model": "scorer", "version": v,
                                   "replicas": []} for v in ("1", "2")],
            "model_endpoints": [{"project": "fraud", "model": "scorer",
                                 "rule": rule_for(status).model_dump()}],
        })  # fmt: skip

        loop = asyncio.new_event_loop()  # no replicas: nothing runs on it
        table = compile_table(spec, "localhost", UpstreamRegistry(loop, PoolLimits()), VersionStats)
        loop.close()
        target = table.by_host["scorer.fraud.localhost"]
        assert isinstance(target, ModelTarget)
        return {u: target.route({"X-User": u})[0].version for u in map(str, range(2000))}

    at20, at50 = versions_at(20), versions_at(50)
    on_candidate = {u for u, v in at20.items() if v == "2"}
    assert 0.15 < len(on_candidate) / 2000 < 0.25
    assert all(at50[u] == "2" for u in on_candidate)
    moved = {u for u in at20 if at20[u] == "1" and at50[u] == "2"}
    assert 0.25 < len(moved) / 2000 < 0.35
