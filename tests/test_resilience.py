"""Under load: table swaps fail nothing, removed replicas drain, a killed replica costs
only the requests it had in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

import aiohttp

from merlin_dp.gateway.pool.http1 import Http1Pool
from merlin_dp.gateway.pool.upstream import PoolLimits, Upstream, UpstreamStats
from tests.conftest import Procs, model_endpoint, start_replicas, version


async def load(
    gw: Any, seconds: float, concurrency: int, path: str = "/v1/predict"
) -> tuple[Counter[str], list[str]]:
    """Closed-loop clients; returns who served what and every failure."""
    served: Counter[str] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            try:
                async with gw.request("POST", "scorer.fraud.localhost", path, data=b"{}") as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        failures.append(f"{resp.status} {body[:200]!r}")
                    else:
                        served[resp.headers["X-Model-Version"]] += 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return served, failures


async def test_route_swaps_under_load_fail_nothing(gateway_factory: Any, replicas: Any) -> None:
    a, b, c = await start_replicas(replicas, "a", "b", "c")
    tables = [
        ({"1": 100, "2": 0}, [a.address, b.address], [c.address]),
        ({"1": 50, "2": 50}, [b.address, c.address], [a.address]),
        ({"1": 0, "2": 100}, [c.address], [a.address, b.address]),
        ({"1": 90, "2": 10}, [a.address], [b.address, c.address]),
    ]

    def spec(revision: int) -> dict[str, Any]:
        weights, v1, v2 = tables[revision % len(tables)]
        return {
            "revision": revision,
            "version_endpoints": [
                version("fraud", "scorer", "1", v1),
                version("fraud", "scorer", "2", v2),
            ],
            "model_endpoints": [model_endpoint("fraud", "scorer", weights)],
        }

    gw = await gateway_factory(spec(0))

    async def swapper() -> int:
        revision = 0
        for _ in range(20):
            await asyncio.sleep(0.1)
            revision += 1
            await gw.set_routes(spec(revision))
        return revision

    # Slow requests (50 ms) keep plenty in flight on replicas as they leave the table.
    (served, failures), swaps = await asyncio.gather(load(gw, 2.5, 16, "/sleep?s=0.05"), swapper())
    assert swaps == 20
    assert failures == []
    assert served["1"] > 0 and served["2"] > 0


async def test_removed_replica_drains_in_flight_requests(
    gateway_factory: Any, replicas: Any
) -> None:
    a, b = await start_replicas(replicas, "a", "b")

    def spec(revision: int, v1: list[str]) -> dict[str, Any]:
        return {
            "revision": revision,
            "version_endpoints": [version("fraud", "scorer", "1", v1)],
            "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
        }

    gw = await gateway_factory(spec(0, [a.address]))
    slow = [
        asyncio.ensure_future(
            gw.request("GET", "scorer.fraud.localhost", "/sleep?s=0.5").__aenter__()
        )
        for _ in range(5)
    ]
    await asyncio.sleep(0.2)
    old = gw.worker.proxy.table.versions[0].upstreams[0]
    assert old.outstanding == 5
    await gw.set_routes(spec(1, [b.address]))
    assert old.draining
    # New requests go to b; the five on a finish normally.
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
        assert (await resp.json())["served_by"] == "b"
    for fut in slow:
        resp = await fut
        assert resp.status == 200
        assert (await resp.json())["served_by"] == "a"
        resp.release()
    assert old.outstanding == 0
    assert gw.worker.http1.idle.get(old, []) == []  # its connections closed once idle


async def test_killed_replica_costs_only_its_in_flight_requests(
    gateway_factory: Any, procs: Procs
) -> None:
    reps = [procs.replica(n) for n in ("a", "b", "c")]
    spec = {
        "version_endpoints": [
            version("fraud", "scorer", "1", [f"127.0.0.1:{r.port}" for r in reps])
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }
    gw = await gateway_factory(spec)
    victim_port = reps[0].port
    in_flight_at_kill: list[int] = []

    async def killer() -> None:
        await asyncio.sleep(1.0)
        up: Upstream = next(
            u for u in gw.worker.proxy.table.versions[0].upstreams if u.port == victim_port
        )
        # Read and kill without yielding to the loop: nothing can start in between.
        in_flight_at_kill.append(up.outstanding)
        os.killpg(reps[0].pid, signal.SIGKILL)

    (served, failures), _ = await asyncio.gather(load(gw, 3.0, 16), killer())
    assert sum(served.values()) > 100
    assert len(failures) <= in_flight_at_kill[0], (failures, in_flight_at_kill)
    for failure in failures:
        assert failure.startswith("502"), failure


async def test_a_request_sent_on_a_connection_its_replica_had_closed_is_marked_unread() -> None:
    """The race behind a killed replica's extra failure: the replica's FIN is in the
    gateway's socket but not yet seen when a request is sent on that pooled connection.
    The replica's kernel answers the request with RST, so it provably went unread and
    may go to another replica, POST or not; an EOF alone would not prove it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    answered, closed = threading.Event(), threading.Event()

    def replica() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        answered.set()
        closed.wait(5)
        conn.close()  # nothing unread: a FIN, as from a replica that died idle

    thread = threading.Thread(target=replica)
    thread.start()
    loop = asyncio.get_running_loop()
    limits, stats = PoolLimits(), UpstreamStats()
    pool = Http1Pool(loop, limits, stats)
    up = Upstream("127.0.0.1", listener.getsockname()[1], loop, limits, stats)
    request = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    try:
        conn = await pool.connect(up)
        conn.begin(request, no_body=False, timeout=5)
        while not conn.complete:
            await conn.wait()
        conn.finish()
        pool.release(conn)
        closed.set()
        thread.join()
        time.sleep(0.05)  # noqa: ASYNC251 -- the FIN arrives while the loop, blocked, sees nothing
        again = pool.take_idle(up)
        assert again is conn
        again.begin(request, no_body=False, timeout=5)
        assert again.reused
        while again.error is None and not again.complete:
            await again.wait()
        assert again.error is not None and not again.complete
        assert again.error.unread, again.error
    finally:
        closed.set()
        thread.join()
        pool.close()
        listener.close()
