"""Stopping and restarting: SIGTERM finishes in-flight requests; dead workers come back."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from tests.conftest import Procs, model_endpoint, version, write_routes


def routes(tmp: Path, port: int) -> Path:
    path = tmp / "routes.json"
    write_routes(
        path,
        {
            "version_endpoints": [version("fraud", "scorer", "1", [f"127.0.0.1:{port}"])],
            "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
        },
    )
    return path


async def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, procs: Procs) -> None:
    rep = procs.replica("slow")
    gw, _ = procs.gateway(routes(tmp_path, rep.port))
    headers = {"Host": "scorer.fraud.localhost"}
    async with aiohttp.ClientSession() as s:

        async def slow() -> int:
            async with s.get(f"http://127.0.0.1:{gw.port}/sleep?s=1", headers=headers) as r:
                await r.read()
                return r.status

        calls = [asyncio.ensure_future(slow()) for _ in range(5)]
        await asyncio.sleep(0.4)
        gw.kill(signal.SIGTERM)
        assert await asyncio.gather(*calls) == [200] * 5
    # It stopped listening and exits by itself.
    for _ in range(100):
        if gw.popen.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert gw.popen.returncode == 0


async def test_supervisor_restarts_a_dead_worker(tmp_path: Path, procs: Procs) -> None:
    rep = procs.replica("v1")
    gw, admin = procs.gateway(routes(tmp_path, rep.port), "--workers", "2")

    async def workers(s: aiohttp.ClientSession) -> list[dict[str, object]]:
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
            body = await r.json()
            return list(body["workers"]) if r.status == 200 else []

    async with aiohttp.ClientSession() as s:
        before: list[dict[str, object]] = []
        for _ in range(100):
            before = await workers(s)
            if len(before) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(before) == 2
        victim = int(str(before[0]["pid"]))
        os.kill(victim, signal.SIGKILL)
        after: list[dict[str, object]] = []
        for _ in range(150):
            after = await workers(s)
            pids = {int(str(w["pid"])) for w in after}
            if len(after) == 2 and victim not in pids:
                break
            await asyncio.sleep(0.1)
        assert len(after) == 2 and victim not in {int(str(w["pid"])) for w in after}
        async with s.post(f"http://127.0.0.1:{gw.port}/v1/predict",
                          headers={"Host": "scorer.fraud.localhost"}) as r:  # fmt: skip
            assert r.status == 200
