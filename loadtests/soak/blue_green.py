"""Scenario 2, ``blue-green``: switch from version 1 to 2 and roll back, ten times, while
the normal clients load the stack."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario, two_versions
from loadtests.soak.stack import Stack


async def scenario_blue_green(
    workdir: Path, cycles: int = 10, pause: float = 1.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        answers: Counter[str] = Counter()
        for _ in range(cycles):
            for verb in ("switch", "rollback"):
                status, body = await stack.call("POST", f"/endpoint:{verb}", {})
                answers[f"{verb} {status}"] += 1
                if status != 200:
                    run.result.notes.append(f"{verb} refused: {status} {body}")
                await asyncio.sleep(pause)
        run.result.notes.append(
            "API answers: " + ", ".join(f"{n}x {a}" for a, n in sorted(answers.items()))
        )

    return await run_scenario(
        workdir, 2, "blue-green",
        f"switch v1→v2 and rollback, {cycles} times, {pause:g} s apart",
        two_versions({"1": 100, "2": 0}), action, limit=cycles * pause * 2 + 120,
    )  # fmt: skip
