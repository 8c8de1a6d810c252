"""The admin port, route-file reloads, and several workers behind one port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.common.net import free_port
from merlin_dp.gateway.admin import admin_app, start_admin
from tests.conftest import (
    ROOT,
    Proc,
    Procs,
    model_endpoint,
    start_replicas,
    version,
    wait_port,
    write_routes,
)


def spec(
    revision: int, replicas: list[str], weights: dict[str, int] | None = None
) -> dict[str, Any]:
    return {
        "revision": revision,
        "version_endpoints": [
            version("fraud", "scorer", "1", replicas),
            version("fraud", "scorer", "2", replicas),
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", weights or {"1": 100, "2": 0})],
    }


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_health_and_readiness(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(spec(1, [r1.address]))

    async def reports() -> list[Any]:
        return [gw.worker.report()]

    runner, port = await start_admin(admin_app(reports), "127.0.0.1", 0)
    try:
        for _ in range(7):
            async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
                assert resp.status == 200
        async with gw.request("GET", "nope.fraud.localhost", "/") as resp:
            assert resp.status == 404
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            async with s.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
                ready = await resp.json()
                assert resp.status == 200
        labels = {"project": "fraud", "model": "scorer", "version": "1", "code": "200"}
        assert metric(text, "gateway_requests_total", chosen_by="weight", **labels) == 7
        assert metric(text, "gateway_request_duration_seconds_count", **labels) == 7
        assert metric(text, "gateway_request_duration_seconds_bucket", le="+Inf", **labels) == 7
        assert metric(text, "gateway_unrouted_requests_total", code="404") == 1
        assert metric(text, "gateway_in_flight_requests", version="1") == 0
        assert metric(text, "gateway_route_table_revision") == 1
        assert metric(text, "gateway_upstream_connects_total") >= 1
        assert ready["ready"] is True
        assert ready["workers"][0]["revision"] == 1
    finally:
        await runner.cleanup()


async def test_bad_route_file_keeps_last_good_table(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(spec(1, [r1.address]))
    bad = spec(2, [r1.address], {"1": 60, "2": 60})
    write_routes(gw.routes, bad)
    gw.worker.source.poke()
    for _ in range(100):
        if gw.worker.last_error:
            break
        await asyncio.sleep(0.02)
    report = gw.worker.report()
    assert "weights must sum to 100, got 120" in report["last_error"]
    assert report["revision"] == 1
    assert report["metrics"]["table"]["errors"] == 1
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
        assert resp.status == 200
    # A good file is picked up again.
    await gw.set_routes(spec(3, [r1.address], {"1": 0, "2": 100}))
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
        assert resp.headers["X-Model-Version"] == "2"


async def test_not_ready_until_a_table_loads(tmp_path: Path, procs: Procs) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text("{not json")
    gw, admin = procs.gateway(routes)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert "not valid json" in body["workers"][0]["last_error"]
        async with s.get(f"http://127.0.0.1:{gw.port}/v1/predict",
                         headers={"Host": "scorer.fraud.localhost"}) as resp:  # fmt: skip
            assert resp.status == 404
        write_routes(routes, spec(5, ["127.0.0.1:1"]))
        for _ in range(100):
            async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 200


async def test_workers_share_the_port_and_metrics_add_up(tmp_path: Path, procs: Procs) -> None:
    rep = procs.replica("v1")
    routes = tmp_path / "routes.json"
    write_routes(routes, spec(1, [f"127.0.0.1:{rep.port}"]))
    gw, admin = procs.gateway(routes, "--workers", "2")
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                if resp.status == 200:
                    ready = await resp.json()
                    break
            await asyncio.sleep(0.1)
        assert len(ready["workers"]) == 2 and ready["ready"]
        n = 200
        # Fresh connections each time, so the kernel spreads them over both workers.
        for _ in range(n):
            async with (
                aiohttp.ClientSession() as c,
                c.post(
                    f"http://127.0.0.1:{gw.port}/v1/predict",
                    headers={"Host": "scorer.fraud.localhost"},
                ) as resp,
            ):
                assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as resp:
            text = await resp.text()
    # 200 fresh connections land on both workers (SO_REUSEPORT hashes them), so only a
    # merged count reaches 200.
    assert metric(text, "gateway_requests_total", version="1", code="200") == n
    assert len({w["pid"] for w in ready["workers"]}) == 2


@pytest.mark.parametrize("workers_count", [1, 2])
async def test_source_and_connection_gauges_read_what_is_true(
    tmp_path: Path, procs: Procs, workers_count: int
) -> None:
    """gateway_route_source_connected read 2 connected and 1 disconnected with one
    worker (3 and 1 with two): the merge started from a snapshot that counted as
    connected. gateway_client_connections read 1-7 with nothing open: it was read from
    aiohttp's list of connections before aiohttp dropped the closed one."""
    port = free_port()

    def controller() -> Proc:
        proc = Proc(
            [sys.executable, "-m", "merlin_dp", "controller", "--runtime", "none",
             "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"],
            port, tmp_path / f"controller-{len(procs.started)}.log",
        )  # fmt: skip
        procs.started.append(proc)
        wait_port(port)
        return proc

    ctl = controller()
    gw_port, admin = free_port(), free_port()
    gateway = Proc(
        [sys.executable, "-m", "merlin_dp", "gateway", "--controller",
         f"http://127.0.0.1:{port}", "--listen", f"127.0.0.1:{gw_port}",
         "--admin", f"127.0.0.1:{admin}", "--workers", str(workers_count)],
        gw_port, tmp_path / "gateway.log",
    )  # fmt: skip
    procs.started.append(gateway)
    wait_port(gw_port)
    wait_port(admin)
    async with aiohttp.ClientSession() as s:

        async def gauge(name: str) -> float:
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                return metric(await resp.text(), name)

        async def source_connected(connected: bool) -> float:
            # Each worker says whether it follows the controller (it reconnects within a
            # second); the gauge must agree.
            for _ in range(200):
                async with s.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    workers = (await resp.json())["workers"]
                if all(w["source_connected"] is connected for w in workers):
                    break
                await asyncio.sleep(0.05)
            assert len(workers) == workers_count and all(
                w["source_connected"] is connected for w in workers
            ), workers
            return await gauge("gateway_route_source_connected")

        async def connections_when_all_closed() -> float:
            for _ in range(100):  # the gateway sees the closes a moment after the client
                if (open_now := await gauge("gateway_client_connections")) == 0:
                    break
                await asyncio.sleep(0.05)
            return open_now

        assert await source_connected(True) == 1
        for _ in range(20):  # fresh connections, closed, spread over the workers
            async with (
                aiohttp.ClientSession() as c,
                c.get(f"http://127.0.0.1:{gw_port}/", headers={"Host": "x.y.localhost"}) as r,
            ):
                assert r.status == 404
        assert await connections_when_all_closed() == 0
        ctl.stop()
        assert await source_connected(False) == 0
        controller()
        assert await source_connected(True) == 1
        assert await connections_when_all_closed() == 0


def test_cli_help_is_useful() -> None:
    out = subprocess.run([sys.executable, "-m", "merlin_dp", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "gateway" in out
    out = subprocess.run([sys.executable, "-m", "merlin_dp", "gateway", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for flag in ("--routes", "--listen", "--admin", "--workers", "--domain", "/serving/"):
        assert flag in out
    missing = subprocess.run([sys.executable, "-m", "merlin_dp", "gateway"], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0
    assert "pass --routes FILE" in missing.stderr
