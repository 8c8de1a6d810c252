"""Scenario 6, ``redis-restart``: with the controller's store and the gateway's feed on
Redis, Redis killed with SIGKILL and started again (its append-only file kept); the
gateway keeps serving meanwhile and a switch afterwards reaches it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from loadtests.harness.routes import weighted_rule
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, check_switch, run_scenario
from loadtests.soak.stack import Stack, StackPlan, VersionPlan


async def scenario_redis_restart(
    workdir: Path, down: float = 3.0, after: float = 8.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(1)
        assert stack.redis is not None
        stack.redis.kill(signal.SIGKILL)
        stack.redis.popen.wait(5)
        await asyncio.sleep(down)
        failed_while_down = sum(len(x.failures) for x in run.loads)
        await stack.start_redis()
        run.result.notes.append(
            f"Redis SIGKILLed, restarted after {down:g} s (append-only file kept); "
            f"failures while it was down: {failed_while_down}"
        )
        await asyncio.sleep(2)
        await check_switch(stack, run, "after Redis came back")
        await asyncio.sleep(after)

    plan = StackPlan(
        {"1": VersionPlan(), "2": VersionPlan()}, weighted_rule({"1": 100, "2": 0}), redis=True
    )
    return await run_scenario(
        workdir, 6, "redis-restart",
        f"controller --store redis, gateway --redis; Redis SIGKILLed, restarted {down:g} s "
        "later, then a switch",
        plan, action, limit=180,
    )  # fmt: skip
