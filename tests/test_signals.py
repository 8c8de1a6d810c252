"""Per-second autoscaling signals from the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from merlin_dp.gateway.admin import admin_app, start_admin
from merlin_dp.gateway.metrics import CHOSEN_WEIGHT, MirrorStats, VersionStats
from merlin_dp.gateway.signals import SignalRecorder
from merlin_dp.spec.signals import LATENCY_BUCKETS, merge_records
from tests.conftest import model_endpoint, start_replicas, version


def test_recorder_closes_each_second_with_means_arrivals_and_service_time() -> None:
    now = [100.0]
    vs = VersionStats("fraud", "scorer", "1")
    rec = SignalRecorder(lambda: [vs], clock=lambda: now[0])
    # Second 100: in flight 2 for half the samples, 4 for the other half, of which 1 and
    # then 3 queued; 7 arrivals; 5 exchanges ended, 0.25 s in all.
    vs.arrivals = 7
    for i in range(20):
        vs.in_flight = 2 if i < 10 else 4
        vs.queued = 1 if i < 10 else 3
        rec.sample()
        now[0] += 0.05
    vs.in_flight = vs.queued = 0
    vs.served, vs.service_seconds = 5, 0.25
    now[0] = 101.0
    rec.sample()  # crosses into second 101: closes 100
    assert rec.since(0) == [{"project": "fraud", "model": "scorer", "version": "1",
                             "second": 100, "requests": 7, "concurrency": 3.0,
                             "in_service": 1.0, "queued": 2.0, "completions": 5,
                             "service_seconds": 0.25}]  # fmt: skip
    # An idle second leaves no record; counts are per second, not in total.
    now[0] = 102.0
    rec.sample()
    vs.arrivals, vs.served, vs.service_seconds = 10, 8, 0.40
    now[0] = 103.0
    rec.sample()
    (last,) = rec.since(100)
    assert (last["requests"], last["completions"]) == (3, 3)
    assert abs(last["service_seconds"] - 0.15) < 1e-9


async def test_gateway_serves_signals_on_its_admin_port(
    gateway_factory: Any, replicas: Any
) -> None:
    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory({
        "version_endpoints": [version("fraud", "scorer", "1", [r1.address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    })  # fmt: skip

    async def reports() -> list[Any]:
        return [gw.worker.report()]

    runner, port = await start_admin(admin_app(reports), "127.0.0.1", 0)
    try:

        async def slow() -> None:
            async with gw.request("GET", "scorer.fraud.localhost", "/sleep?s=1.2") as r:
                await r.read()

        await asyncio.gather(*(slow() for _ in range(4)))
        await asyncio.sleep(1.1)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/signals") as r:
            signals = (await r.json())["signals"]
    finally:
        await runner.cleanup()
    assert sum(x["requests"] for x in signals) == 4
    # Four requests held for 1.2 s: some full second saw about four in flight.
    assert max(x["concurrency"] for x in signals) > 3.0


def test_recorder_reports_answers_errors_and_latency_per_second() -> None:
    """What rollouts judge: answers (a client that left is none), server errors (5xx, a
    gRPC server fault; not a caller's 4xx or INVALID_ARGUMENT) and the latency
    histogram, as differences between one second's totals and the last's."""
    now = [100.0]
    vs = VersionStats("fraud", "scorer", "1")
    ms = MirrorStats("fraud", "scorer", "2")
    rec = SignalRecorder(lambda: [vs], lambda: [ms], clock=lambda: now[0])
    rec.sample()
    for code, seconds in ((200, 0.004), (200, 0.02), (404, 0.001), (503, 0.3), (499, 1.0)):
        vs.record(CHOSEN_WEIGHT, code, seconds)
    for code in (0, 3, 13, 1):  # OK, INVALID_ARGUMENT, INTERNAL, CANCELLED
        vs.record_grpc(CHOSEN_WEIGHT, code, 0.004)
    ms.latency.observe(0.02)
    ms.latency.observe(0.02)
    ms.server_errors += 1
    ms.count("error", "timeout")  # sent, never answered: a server error too
    ms.count("error", "no_replica")  # never sent: not the candidate's answer
    ms.compared_pair(server_error=False, status_differs=False, body_differs=True)
    ms.compared_pair(server_error=True, status_differs=True, body_differs=False)
    now[0] = 101.0
    rec.sample()
    first, copies = rec.since(0)
    assert (first["version"], copies["version"]) == ("1", "2")
    assert (first["answered"], first["errors"]) == (7, 2)
    assert sum(first["latency"]) == 7 and first["latency"][LATENCY_BUCKETS.index(0.005)] == 4
    # The mirrored version served no caller: its record carries its copies alone.
    assert copies["requests"] == 0 and "answered" not in copies
    assert (copies["shadow_answered"], copies["shadow_errors"]) == (3, 2)
    assert sum(copies["shadow_latency"]) == 2
    assert (copies["compared"], copies["differed"]) == (1, 1)
    # Next second: only what happened since.
    vs.record(CHOSEN_WEIGHT, 200, 0.004)
    now[0] = 102.0
    rec.sample()
    second = rec.since(100)[0]
    assert (second["answered"], second["errors"], sum(second["latency"])) == (1, 0, 1)
    assert "shadow_answered" not in second


def test_records_of_one_second_add_up_with_their_histograms() -> None:
    base: dict[str, Any] = {"project": "p", "model": "m", "version": "1", "second": 5,
                            "requests": 1, "concurrency": 0.0, "in_service": 0.0,
                            "queued": 0.0, "completions": 1, "service_seconds": 0.1}  # fmt: skip
    a = {**base, "answered": 2, "errors": 1, "latency": [1, 1]}
    b = {**base, "answered": 3, "latency": [0, 1, 2], "compared": 4}
    (merged,) = merge_records([a, b])  # type: ignore[list-item]
    assert merged["answered"] == 5 and merged["errors"] == 1 and merged["compared"] == 4
    assert merged["latency"] == [1, 2, 2]
    assert a["latency"] == [1, 1]  # the inputs are left as they were
