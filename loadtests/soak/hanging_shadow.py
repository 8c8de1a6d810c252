"""Scenario 7, ``hanging-shadow``: every request mirrored to version 2, whose replica never
answers; the primary's answers must not wait for the shadow's."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtests.harness.prometheus import label_text, samples_named
from loadtests.harness.routes import weighted_rule, with_mirror
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario
from loadtests.soak.stack import Stack, StackPlan, VersionPlan


async def scenario_hanging_shadow(workdir: Path, duration: float = 40.0) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(duration)
        text = await stack.gateway_metrics()
        results = samples_named(text, "gateway_shadow_requests_total")
        summary = ", ".join(
            f"{int(s.value)}x {s.labels.get('result', '')}"
            + (f" ({s.labels['reason']})" if s.labels.get("reason") else "")
            for s in sorted(results, key=lambda s: label_text(s.labels))
        )
        run.result.notes.append(f"mirrored copies: {summary or 'no shadow metrics found'}")

    plan = StackPlan(
        {"1": VersionPlan(), "2": VersionPlan(hang=True)},
        with_mirror(weighted_rule({"1": 100, "2": 0}), "2", 100),
    )
    return await run_scenario(
        workdir, 7, "hanging-shadow",
        f"100% mirrored to v2, whose replica never answers, for {duration:g} s "
        "(rule timeout 30 s)",
        plan, action, limit=duration + 120,
    )  # fmt: skip
