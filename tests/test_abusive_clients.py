"""Abusive clients on the traffic port: a head sent a byte at a time gets 408 and is
closed, connections past the cap get 503 and are closed, and normal clients beside
them are served throughout."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from gateway.config import GatewayConfig
from gateway.metrics import render
from tests.conftest import Gateway, Replica, model_endpoint, start_replicas, version

HOST = "scorer.fraud.localhost"


def routes(replica: Replica) -> dict[str, Any]:
    return {
        "version_endpoints": [version("fraud", "scorer", "1", [replica.address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def test_a_slow_head_gets_408_while_others_are_served(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), GatewayConfig(header_timeout_seconds=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    got = bytearray()

    async def collect() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                got.extend(chunk)

    collecting = asyncio.ensure_future(collect())
    writer.write(f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode())
    served = 0
    try:
        for _ in range(30):  # a byte every 50 ms, never finishing the head
            if collecting.done():
                break
            writer.write(b"a")
            async with gw.request("GET", HOST, "/x") as resp:
                assert resp.status == 200
                served += 1
            await asyncio.sleep(0.05)
        await asyncio.wait_for(collecting, 5)
    finally:
        writer.close()
    answer = bytes(got)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b'"code":"request_timeout"' in answer or b"request head" in answer
    assert served >= 5
    text = render(gw.worker.metrics.snapshot()).decode() if gw.worker else ""
    assert 'gateway_client_connections_cut_total{reason="head_timeout"} 1.0' in text


async def test_a_slow_body_after_a_whole_head_is_not_cut(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    # The head timeout is for heads only: an upload that trickles in is a streaming body.
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), GatewayConfig(header_timeout_seconds=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10\r\n\r\n".encode())
        for _ in range(10):
            writer.write(b"z")
            await asyncio.sleep(0.08)
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line


async def test_connections_past_the_cap_get_503_and_are_closed(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), GatewayConfig(max_connections=5))
    idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(5)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        answer = await read_all(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"too many open connections" in answer
    finally:
        for _, w in idle:
            w.close()
    # Once they are gone, a normal client is served again.
    assert gw.worker is not None
    for _ in range(100):
        if gw.worker.metrics.connections.open == 0:
            break
        await asyncio.sleep(0.02)
    async with gw.request("GET", HOST, "/x") as resp:
        assert resp.status == 200
    text = render(gw.worker.metrics.snapshot()).decode()
    assert 'gateway_client_connections_cut_total{reason="max_connections"} 1.0' in text
