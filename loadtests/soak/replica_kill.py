"""Scenario 3, ``replica-kill``: a ready replica of three killed with SIGKILL every 10 s;
only the requests in flight on it may fail, and the controller brings the count back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path

from loadtests.harness.routes import weighted_rule
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario, sleep_until, wait_replicas
from loadtests.soak.stack import Stack, StackPlan, VersionPlan


async def kill_serving_replica(stack: Stack, run: Run, version: str, rng: random.Random) -> str:
    """SIGKILL one replica that the controller lists as ready; what was killed."""
    ready = {int(a.rpartition(":")[2]) for a in await stack.ready_replicas(version)}
    candidates = [(pid, port) for pid, port in stack.replica_processes() if port in ready]
    if not candidates:
        return "no ready replica to kill"
    pid, port = rng.choice(sorted(candidates))
    run.killed_pids.add(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    run.kill_times.append(time.monotonic())
    return f"pid {pid} (port {port})"


async def scenario_replica_kill(
    workdir: Path, duration: float = 60.0, every: float = 10.0, replicas: int = 3
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        rng = random.Random(3)
        start = time.monotonic()
        kills = 0
        lowest = replicas
        while True:
            at = start + every / 2 + kills * every
            if at > start + duration:
                break
            while time.monotonic() < at:
                lowest = min(lowest, len(await stack.ready_replicas("1")))
                await asyncio.sleep(min(0.2, max(0.0, at - time.monotonic())))
            what = await kill_serving_replica(stack, run, "1", rng)
            kills += 1
            run.note(f"SIGKILL {what}")
        await sleep_until(start + duration)
        back = await wait_replicas(stack, "1", replicas, 30.0)
        run.result.notes.append(
            f"{kills} kills; fewest ready replicas seen {lowest} of {replicas}; "
            + (f"all {replicas} ready again" if back else "NOT all ready again within 30 s")
        )

    n = int((duration - every / 2) // every) + 1
    return await run_scenario(
        workdir, 3, "replica-kill",
        f"SIGKILL a ready replica of {replicas} every {every:g} s ({n} kills)",
        StackPlan({"1": VersionPlan(replicas=replicas)}, weighted_rule({"1": 100})),
        action, limit=duration + 150,
    )  # fmt: skip
