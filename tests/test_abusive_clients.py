"""Abusive clients on the traffic port: a head sent a byte at a time gets 408 and is
closed, connections past the cap get 503 and are closed, and normal clients beside
them are served throughout.

Every request head has its clock, whenever its first byte comes: with the connection
itself, behind a whole request in the same packet, or behind a slow answer; and the
clock neither cuts a body nor a keep-alive connection with no head under way."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any

import pytest

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.exposition import render
from tests.conftest import Gateway, Replica, model_endpoint, start_replicas, version

HOST = "scorer.fraud.localhost"


def routes(replica: Replica) -> dict[str, Any]:
    return {
        "version_endpoints": [version("fraud", "scorer", "1", [replica.address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def connect_with(
    port: int, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose first bytes are in the gateway's socket before it accepts it,
    so they arrive with the connection, before aiohttp's handler task has run: what a
    client on another host usually does, and what an asyncio client on the gateway's own
    loop can't (the gateway accepts before it writes)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(first)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


def statuses(answers: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer, by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(length[1]) if length else 0), 10)
    return head + body


def head_timeouts(gw: Gateway) -> int:
    assert gw.worker is not None
    return gw.worker.metrics.connections.head_timeouts


QUICK = GatewayConfig(header_timeout_seconds=0.5)
GET = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
PARTIAL = f"GET /y HTTP/1.1\r\nHost: {HOST}\r\nX-Never: ".encode()


def post(body: bytes) -> bytes:
    return (
        f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def test_a_partial_head_that_comes_with_the_connection_gets_408(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    """The common case, and it had no clock: the bytes came before aiohttp's handler task
    waited for them, so the connection was held, silent, for the 75 s keep-alive."""
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), QUICK)
    reader, writer = await connect_with(gw.port, PARTIAL)
    try:
        answer = await read_all(reader, 10)  # until the gateway closes
    finally:
        writer.close()
    assert statuses(answer) == [408], answer
    assert b'"code":"request_timeout"' in answer
    assert head_timeouts(gw) == 1


async def test_a_head_dripped_from_the_first_byte_gets_408(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), QUICK)
    reader, writer = await connect_with(gw.port, PARTIAL[:1])
    answer = asyncio.ensure_future(read_all(reader, 10))
    try:
        for byte in PARTIAL[1:]:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        got = await answer
    finally:
        writer.close()
    assert statuses(got) == [408], got
    assert head_timeouts(gw) == 1


async def test_a_partial_head_behind_a_whole_request_gets_408(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    """The second request on a keep-alive connection, started in the first one's packet:
    the first was answered, the second held for the keep-alive timeout."""
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), QUICK)
    reader, writer = await connect_with(gw.port, GET + PARTIAL)
    try:
        answers = await read_all(reader, 10)
    finally:
        writer.close()
    assert statuses(answers) == [200, 408], answers
    assert head_timeouts(gw) == 1


async def test_a_partial_head_behind_a_slow_answer_gets_408_after_it(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    """The head's clock runs out while the request before it is still being answered:
    the answer goes out first, then the 408 (answers keep their order)."""
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), GatewayConfig(header_timeout_seconds=0.2))
    slow = f"GET /sleep?s=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    reader, writer = await connect_with(gw.port, slow + PARTIAL)
    try:
        answers = await read_all(reader, 10)
    finally:
        writer.close()
    assert statuses(answers) == [200, 408], answers
    assert head_timeouts(gw) == 1


async def test_a_slow_body_after_a_head_that_came_with_the_connection_is_not_cut(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), GatewayConfig(header_timeout_seconds=0.3))
    body = b"0123456789"
    reader, writer = await connect_with(gw.port, post(body)[: -len(body) + 1])
    try:
        for byte in body[1:]:
            await asyncio.sleep(0.08)  # the body takes three header timeouts
            writer.write(bytes([byte]))
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert statuses(answer) == [200] and answer.endswith(body), answer
    assert head_timeouts(gw) == 0


@pytest.mark.parametrize(
    "first",
    [GET, post(b'{"x": 1}'), GET + post(b"{}") + post(b'{"y": 2}'), post(b"{}") + b"\r\n"],
    ids=["a GET", "a POST", "three pipelined", "a POST and an empty line"],
)
async def test_whole_requests_leave_the_connection_to_its_keep_alive(
    gateway_factory: Any, replicas: list[Replica], first: bytes
) -> None:
    """Whole requests in the connection's first packet are answered and start no clock
    that later cuts the idle connection (a pipelined packet may start one, unsure; when
    it runs out, no head is under way and nothing happens)."""
    [r1] = await start_replicas(replicas, "r1")
    gw: Gateway = await gateway_factory(routes(r1), QUICK)
    reader, writer = await connect_with(gw.port, first)
    try:
        for _ in range(first.count(b" HTTP/1.1\r\n")):
            assert statuses(await read_answer(reader)) == [200]
        await asyncio.sleep(1.5)  # three header timeouts, idle
        writer.write(GET)
        assert statuses(await read_answer(reader)) == [200]
    finally:
        writer.close()
    assert head_timeouts(gw) == 0


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
