"""Scenario 4, ``scale``: 1 → 4 → 1 replicas by the autoscaler's policy (concurrency,
target 1) while the load ramps up and down, and staying at one under the same light load
afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtests.harness.errors import HarnessError
from loadtests.harness.prometheus import label_text, samples_named
from loadtests.harness.routes import weighted_rule
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario, wait_replicas
from loadtests.soak.stack import Stack, StackPlan, VersionPlan


async def scenario_scale(
    workdir: Path, peak_clients: int = 8, delay_ms: float = 50.0, hold: float = 6.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        load = run.load()
        seen: list[int] = []

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                n = len(await stack.ready_replicas("1"))
                if not seen or seen[-1] != n:
                    seen.append(n)
                    run.note(f"{n} ready")
                await asyncio.sleep(0.25)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        try:
            # One client pausing 0.2 s between 50 ms requests (~0.2 busy): one replica.
            await wait_replicas(stack, "1", 1, 30.0)
            await asyncio.sleep(2)
            run.note(f"ramp up: one more client a second, to {peak_clients}, no pauses")
            load.think = 0.0
            for n in range(2, peak_clients + 1):
                load.active = n
                await asyncio.sleep(1)
            up = await wait_replicas(stack, "1", 4, 45.0)
            run.note("4 ready after the ramp" if up else "did NOT reach 4 replicas in 45 s")
            await asyncio.sleep(3)
            run.note("ramp down: one client fewer each 0.5 s, to one pausing 0.2 s again")
            for n in range(peak_clients - 1, 0, -1):
                load.active = n
                await asyncio.sleep(0.5)
            load.think = 0.2
            down = await wait_replicas(stack, "1", 1, 60.0)
            run.note("back to 1 replica" if down else "did NOT get back to 1 replica in 60 s")
            await asyncio.sleep(hold)  # the same light load: does it stay at one?
        finally:
            stop.set()
            await watcher
        run.result.notes.append("ready replicas over time: " + " → ".join(map(str, seen)))
        metrics = await stack.controller_metrics()
        decisions = samples_named(metrics, "merlin_autoscaler_decisions_total")
        if decisions:
            run.result.notes.append(
                "autoscaler decisions: "
                + ", ".join(f"{int(s.value)}x {s.labels.get('reason', label_text(s.labels))}"
                            for s in sorted(decisions, key=lambda s: -s.value))
            )  # fmt: skip
        peak = seen.index(max(seen)) if seen else 0
        if not seen or max(seen) < 4 or 1 not in seen[peak:]:
            raise HarnessError(
                "the autoscaler did not scale 1 → 4 → 1: " + " → ".join(map(str, seen))
            )
        if seen[-1] != 1:
            run.result.notes.append(
                f"after getting back to 1 it went up again to {seen[-1]} under the same light "
                "load (one client, ~0.2 busy)"
            )

    plan = StackPlan(
        {"1": VersionPlan(replicas=1, max_replicas=4, delay_ms=delay_ms)},
        weighted_rule({"1": 100}), autoscale=True,
    )  # fmt: skip
    return await run_scenario(
        workdir, 4, "scale",
        f"load ramps 1 → {peak_clients} clients → 1 (concurrency policy, target 1, "
        "stable window 6 s, scale-down delay 3 s)",
        plan, action, clients=peak_clients, active=1, think=0.2, limit=240,
    )  # fmt: skip
