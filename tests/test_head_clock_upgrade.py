"""The HTTP front's head clock behind a declined upgrade: regression tests from a review
(each test's docstring names the bug it caught)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from merlin_dp.gateway.config import GatewayConfig
from tests.test_proxy_hardening import HOST, RawReplica, spec, statuses

WEBSOCKET = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def conversation(port: int, parts: list[tuple[float, bytes]], guard: float) -> bytes:
    """Write each part after its pause on one connection; everything answered until the
    gateway closes, or ``guard`` seconds after the last write (a hang guard)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    got = bytearray()

    async def read() -> None:
        while chunk := await reader.read(65536):
            got.extend(chunk)

    reading = asyncio.ensure_future(read())
    try:
        for pause, data in parts:
            await asyncio.sleep(pause)
            writer.write(data)
        done, _ = await asyncio.wait({reading}, timeout=guard)
        if reading in done:
            reading.exception()  # a reset ends the conversation too
    finally:
        reading.cancel()
        writer.close()
    return bytes(got)


async def test_a_stale_head_clock_cuts_a_later_head_that_came_in_time(
    gateway_factory: Any,
) -> None:
    """Was a bug of the aiohttp-based front: bytes that arrived behind a declined
    ``Upgrade: websocket`` request started a head clock that the head they held, parsed
    later, never stopped; the clock ran on after that request was answered and cut a
    later head that was arriving in time with a 408. The own front keeps one head clock
    per connection, started by a head's first byte and stopped when that head is whole,
    however the bytes were split around the upgrade. Here: request b arrives at 0.1 s,
    the third head begins at 1.5 s and is whole at 2.7 s (1.2 s, under the 2 s timeout):
    it must be answered, not cut at 2.1 s."""
    answers = 0

    async def slow_first(writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        answers += 1
        if answers == 1:
            await asyncio.sleep(0.5)  # request b arrives while a is being answered
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    replica = await RawReplica(slow_first).start()
    try:
        gw = await gateway_factory(spec(replica.address), GatewayConfig(header_timeout_seconds=2))
        a = b"GET /a HTTP/1.1\r\nHost: " + HOST + b"\r\n" + WEBSOCKET + b"\r\n"
        b = b"GET /b HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
        c = b"GET /c HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
        got = await conversation(gw.port, [(0, a), (0.1, b), (1.4, c[:20]), (1.2, c[20:])], 10)
    finally:
        replica.close()
    assert statuses(got) == [200, 200, 200], got
    assert replica.requests == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1", b"GET /c HTTP/1.1"], got
