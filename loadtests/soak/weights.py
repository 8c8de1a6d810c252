"""Scenario 1, ``weights``: the rule's weights of versions 1 and 2 set at random every
second for a minute while the normal clients load the stack; every change must be
accepted and no request may fail."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from loadtests.harness.routes import weighted_rule
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario, sleep_until, two_versions
from loadtests.soak.stack import Stack


async def scenario_weights(
    workdir: Path, duration: float = 60.0, interval: float = 1.0
) -> ScenarioResult:
    changes: Counter[int] = Counter()

    async def action(stack: Stack, run: Run) -> None:
        rng = random.Random(1)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            tick = time.monotonic() + interval
            w1 = rng.randint(0, 100)
            status, body = await stack.call(
                "PUT", "/endpoint", {"rule": weighted_rule({"1": w1, "2": 100 - w1})}
            )
            changes[status] += 1
            if status not in (200, 201):
                run.result.notes.append(f"weight change refused: {status} {body}")
            await sleep_until(tick)
        run.result.notes.append(
            "weight changes answered: " + ", ".join(f"{n}x {s}" for s, n in sorted(changes.items()))
        )

    n = round(duration / interval)
    return await run_scenario(
        workdir, 1, "weights", f"weights of v1/v2 set at random every {interval:g} s, {n} times",
        two_versions({"1": 50, "2": 50}), action, limit=duration + 120,
    )  # fmt: skip
