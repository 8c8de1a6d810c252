"""The command line of ``python -m loadtests.soak``: which scenarios run (the full set, the
``--short`` set the test suite runs, ``--only``), where their logs go, the report, and the
replica processes a run must not leave behind. ``--serve-replica`` alone is how the
controller's runtime starts a soak replica."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from loadtests.soak.abusive_clients import scenario_abusive
from loadtests.soak.blue_green import scenario_blue_green
from loadtests.soak.controller_restart import scenario_controller_restart
from loadtests.soak.hanging_shadow import scenario_hanging_shadow
from loadtests.soak.redis_restart import scenario_redis_restart
from loadtests.soak.replica import REPLICA_FLAG, orphans, serve_replica
from loadtests.soak.replica_kill import scenario_replica_kill
from loadtests.soak.results import ScenarioResult, report
from loadtests.soak.scale import scenario_scale
from loadtests.soak.weights import scenario_weights

Scenario = Callable[[Path], Awaitable[ScenarioResult]]


def full_set() -> dict[int, Scenario]:
    return {
        1: scenario_weights,
        2: scenario_blue_green,
        3: scenario_replica_kill,
        4: scenario_scale,
        5: scenario_controller_restart,
        6: scenario_redis_restart,
        7: scenario_hanging_shadow,
        8: scenario_abusive,
    }


def short_set() -> dict[int, Scenario]:
    """The brief versions the test suite runs (a few seconds each)."""

    async def weights(d: Path) -> ScenarioResult:
        return await scenario_weights(d, duration=4.0, interval=0.25)

    async def blue_green(d: Path) -> ScenarioResult:
        return await scenario_blue_green(d, cycles=5, pause=0.2)

    async def replica_kill(d: Path) -> ScenarioResult:
        return await scenario_replica_kill(d, duration=5.0, every=2.0)

    async def abusive(d: Path) -> ScenarioResult:
        return await scenario_abusive(d, duration=6.0, idle=5000, slow=5, big_headers=1,
                                      big_bodies=1, chunked_bodies=1)  # fmt: skip

    return {1: weights, 2: blue_green, 3: replica_kill, 8: abusive}


async def run_all(
    scenarios: Mapping[int, Scenario], workdir: Path, echo: bool = True
) -> list[ScenarioResult]:
    results = []
    for number, scenario in scenarios.items():
        if echo:
            print(f"soak: scenario {number} …", file=sys.stderr, flush=True)
        result = await scenario(workdir)
        if echo:
            print(f"soak: scenario {number} ({result.name}): sent {result.sent}, failed "
                  f"{result.failed}, killed in flight {result.killed_in_flight}"
                  + (f", ERROR {result.error.splitlines()[0]}" if result.error else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if list(argv) == [REPLICA_FLAG]:
        serve_replica()
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.soak",
        description="Soak and fault-injection scenarios against a real controller, gateway "
        "and replicas on 127.0.0.1. Prints a Markdown table and ends with "
        "'RESULT soak failed=<n> sent=<n>'.",
    )
    parser.add_argument("--only", default="", metavar="N,N",
                        help="run only these scenarios (1-8)")  # fmt: skip
    parser.add_argument("--short", action="store_true",
                        help="the brief versions the test suite runs (1, 2, 3, 8)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep logs and state here")
    args = parser.parse_args(argv)
    scenarios = short_set() if args.short else full_set()
    if args.only:
        wanted = {int(n) for n in args.only.split(",") if n.strip()}
        unknown = wanted - set(scenarios)
        if unknown:
            parser.error(f"no scenario {sorted(unknown)} in this set ({sorted(scenarios)})")
        scenarios = {n: s for n, s in scenarios.items() if n in wanted}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merlin-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs and state under {workdir}", file=sys.stderr, flush=True)
    import uvloop

    started = time.monotonic()
    try:
        results = uvloop.run(run_all(scenarios, workdir))
    finally:
        left = orphans(workdir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            print(f"soak: killed {len(left)} replica(s) left running", file=sys.stderr)
    print(report(results))
    ok = all(not r.error for r in results) and sum(r.failed for r in results) == 0
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"(ran {time.monotonic() - started:.0f} s)", file=sys.stderr)
    else:
        print(f"(ran {time.monotonic() - started:.0f} s; logs in {workdir})", file=sys.stderr)
    return 0 if ok else 1
