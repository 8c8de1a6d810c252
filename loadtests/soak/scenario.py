"""What every scenario does around its action: bring a stack up, start the normal
clients, run the action while they load the stack, stop everything and account for every
request (:func:`run_scenario`); and the steps several scenarios take."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from loadtests.harness.errors import HarnessError
from loadtests.harness.routes import weighted_rule
from loadtests.soak.load import CLIENTS, Load
from loadtests.soak.results import ScenarioResult
from loadtests.soak.stack import Stack, StackPlan, VersionPlan

Action = Callable[[Stack, "Run"], Awaitable[None]]


@dataclass
class Run:
    """What an action sees and adds to while the load runs."""

    result: ScenarioResult
    loads: list[Load] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)
    kill_times: list[float] = field(default_factory=list)  # monotonic
    t0: float = 0.0  # when the action started (monotonic)

    def load(self) -> Load:
        return self.loads[0]

    def note(self, text: str) -> None:
        """A note stamped with the time since the action's start."""
        self.result.notes.append(f"t={time.monotonic() - self.t0:.1f} s: {text}")


async def run_scenario(
    workdir: Path,
    number: int,
    name: str,
    action_text: str,
    plan: StackPlan,
    action: Action,
    *,
    clients: int = CLIENTS,
    fresh_clients: int = 0,
    active: int | None = None,
    think: float = 0.0,
    warmup: float = 1.0,
    limit: float = 300.0,
) -> ScenarioResult:
    """Bring a stack up, start the normal clients, run ``action``, stop, account."""
    result = ScenarioResult(number, name, action_text)
    stack = Stack(workdir / f"{number}-{name}", plan)
    run = Run(result)
    started = 0.0
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            await stack.start()
            load = Load(stack.port, f"s{number}", clients, active=active)
            load.think = think
            run.loads.append(await load.start())
            if fresh_clients:
                run.loads.append(
                    await Load(stack.port, f"f{number}", fresh_clients, fresh=True).start()
                )
            await asyncio.sleep(warmup)
            result.rss_start = stack.gateway_rss()[0]
            started = run.t0 = time.monotonic()
            await action(stack, run)
    except TimeoutError as exc:
        result.error = f"did not finish within {limit:g} s" if deadline.expired() else repr(exc)
    except HarnessError as exc:
        result.error = str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - started if started else 0.0
        for load in run.loads:
            await load.stop()
        if stack.gateway is not None and not stack.gateway.exited():
            result.rss_end, result.rss_peak = stack.gateway_rss()
        elif stack.gateway is not None:
            result.notes.append(f"the gateway exited ({stack.gateway.popen.returncode})")
        killed = stack.received_by(run.killed_pids) if run.killed_pids else set()
        for load in run.loads:
            result.add_load(load, killed, run.kill_times, started or time.monotonic())
        await stack.stop()
        result.notes += stack.notes
    return result


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def two_versions(weights: Mapping[str, int]) -> StackPlan:
    """Versions 1 and 2, one replica each, split by `weights`; serving the heavier first."""
    return StackPlan(
        versions={"1": VersionPlan(), "2": VersionPlan()},
        rule=weighted_rule(weights),
        serving=max(weights, key=lambda v: weights[v]),
    )


async def wait_replicas(stack: Stack, version: str, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(await stack.ready_replicas(version)) == count:
            return True
        await asyncio.sleep(0.2)
    return False


async def check_switch(stack: Stack, run: Run, when: str, within: float = 15.0) -> None:
    """Switch to version 2 and see the gateway follow (the route feed works again)."""
    status, body = await stack.call("POST", "/endpoint:switch", {"to_version": "2"})
    if status != 200:
        run.result.notes.append(f"switch {when} refused: {status} {body}")
        return
    try:
        took = await stack.wait_serving("2", within)
        run.result.notes.append(f"switch to v2 {when}: the gateway followed in {took:.2f} s")
    except HarnessError as exc:
        run.result.notes.append(f"switch to v2 {when}: the gateway did NOT follow: {exc}")
