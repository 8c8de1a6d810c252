"""Scenario 5, ``controller-restart``: the controller killed with SIGKILL and started again
on the same state directory; the gateway keeps serving meanwhile, the new controller
replaces the old replicas, and a switch afterwards reaches the gateway."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, check_switch, run_scenario, two_versions
from loadtests.soak.stack import Stack


async def scenario_controller_restart(
    workdir: Path, down: float = 3.0, after: float = 8.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(1)
        before = dict(stack.replica_processes())
        assert stack.controller is not None
        stack.controller.kill(signal.SIGKILL)
        stack.controller.popen.wait(5)
        run.note(f"controller SIGKILLed; its {len(before)} replicas keep running")
        await asyncio.sleep(down)
        failed = sum(len(x.failures) for x in run.loads)
        await stack.start_controller()
        run.kill_times.append(time.monotonic())  # it SIGKILLs recorded replicas as it starts
        run.note(f"controller restarted (failures while it was down: {failed})")
        old_ports = set(before.values())
        reaped = fresh = False
        deadline = time.monotonic() + 30
        while not (reaped and fresh) and time.monotonic() < deadline:
            alive = dict(stack.replica_processes())
            if not reaped and not set(before) & set(alive):
                reaped = True
                run.note(f"all {len(before)} old replicas are gone (killed by the new controller)")
            ports = {int(a.rpartition(":")[2]) for v in ("1", "2")
                     for a in await stack.ready_replicas(v)}  # fmt: skip
            if not fresh and ports and not ports & old_ports:
                fresh = True
                run.note("the controller lists only new replicas as ready")
            await asyncio.sleep(0.05)
        gone = set(before) - {pid for pid, _ in stack.replica_processes()}
        run.killed_pids |= gone  # SIGKILLed by the new controller's orphan reaping
        await check_switch(stack, run, "after the restart")
        await asyncio.sleep(after)

    return await run_scenario(
        workdir, 5, "controller-restart",
        f"controller SIGKILLed, restarted {down:g} s later (same state dir), then a switch",
        two_versions({"1": 100, "2": 0}), action, limit=180,
    )  # fmt: skip
