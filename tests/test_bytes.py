"""Bodies pass as the bytes the client sent: compressed bodies reach the replica still
compressed, under their own ``Content-Encoding`` and ``Content-Length``, on both the
buffered and the streamed path; the body limit counts bytes on the wire; every answer
the gateway makes about a body is its JSON error with ``X-Request-Id``.

A raw recording replica on 127.0.0.1 shows exactly what arrived; clients are aiohttp's
and raw sockets. Nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.http.proxy import ProxyLimits
from tests.conftest import model_endpoint, start_replicas, version
from tests.test_bad_inputs import raw_exchange
from tests.test_h2_frames import RawServer

HOST = "scorer.fraud.localhost"
ANSWER = gzip.compress(b'{"predictions": [0.25]}')


@dataclass
class Recorded:
    line: bytes
    headers: dict[str, str]  # lower-cased names
    body: bytes  # de-chunked when the request was chunked


class Recorder(RawServer):
    """A replica that records each request exactly (head fields, body bytes) and answers
    200 with a gzip body of its own, so the response direction is checked too."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head[:-4].split(b"\r\n")
                headers = {}
                for field in fields:
                    name, _, value = field.partition(b":")
                    headers[name.strip().lower().decode()] = value.strip().decode()
                if headers.get("transfer-encoding") == "chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Recorded(line, headers, body))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(ANSWER), ANSWER)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = await Recorder().start()
    yield rec
    await rec.stop()


def spec(address: str) -> dict[str, Any]:
    return {
        "version_endpoints": [version("fraud", "scorer", "1", [address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }


def features(rows: int) -> bytes:
    return json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]] * rows}).encode()


async def test_a_gzip_body_reaches_the_replica_byte_for_byte(
    gateway_factory: Any, recorder: Recorder
) -> None:
    gw = await gateway_factory(spec(recorder.address))
    body = gzip.compress(features(2000))
    assert len(body) < ProxyLimits().buffer_body_bytes  # the buffered path
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with gw.request("POST", HOST, "/v1/predict", data=body, headers=headers) as resp:
        assert resp.status == 200
        # The replica's compressed answer comes back as it was sent, too.
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == ANSWER
    [got] = recorder.requests
    assert got.line == b"POST /v1/models/scorer-1:predict HTTP/1.1"
    assert got.body == body
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["content-length"] == str(len(body))


async def test_a_replica_inflates_the_gzip_body_itself(gateway_factory: Any, replicas: Any) -> None:
    """A real (aiohttp) replica, as the shipped model servers are: before, it got the
    gateway's inflated bytes still labelled gzip, failed to inflate them, and answered 500."""
    (rep,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(spec(rep.address))
    payload = features(5000)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    body = gzip.compress(payload)
    async with gw.request("POST", HOST, "/v1/predict", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        seen = await resp.json()
    assert seen["body_bytes"] == len(payload)
    assert seen["headers"]["Content-Encoding"] == "gzip"


async def test_a_large_gzip_body_streams_through_unchanged(
    gateway_factory: Any, recorder: Recorder
) -> None:
    gw = await gateway_factory(spec(recorder.address))
    body = gzip.compress(os.urandom(600 * 1024))  # random bytes don't shrink
    assert len(body) > ProxyLimits().buffer_body_bytes  # the streamed path
    headers = {"Content-Encoding": "gzip"}
    async with gw.request("POST", HOST, "/v1/predict", data=body, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == ANSWER
    [got] = recorder.requests
    assert got.body == body
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["content-length"] == str(len(body))


async def test_a_chunked_gzip_body_streams_through_unchanged(
    gateway_factory: Any, recorder: Recorder
) -> None:
    gw = await gateway_factory(spec(recorder.address))
    body = gzip.compress(features(20_000))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7000):
            yield body[i : i + 7000]

    headers = {"Content-Encoding": "gzip"}
    async with gw.request("POST", HOST, "/v1/predict", data=chunks(), headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == ANSWER
    [got] = recorder.requests
    assert got.body == body
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in got.headers


async def test_a_body_that_decompresses_past_a_mebibyte_passes_unchanged(
    gateway_factory: Any, recorder: Recorder
) -> None:
    """Before, aiohttp inflated it while reading and answered its own plain-text 413;
    and the limit is on the wire: 8 MiB inflated is far over this gateway's limit."""
    config = GatewayConfig(proxy=ProxyLimits(max_body_bytes=64 * 1024))
    gw = await gateway_factory(spec(recorder.address), config)
    body = gzip.compress(b"\0" * (8 * 1024 * 1024))
    assert len(body) < 64 * 1024
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: %b\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (HOST.encode(), len(body), body)
    )
    status, headers, answer = await raw_exchange(gw.port, request)
    assert status == 200, answer
    assert answer == ANSWER and headers["content-encoding"] == "gzip"
    [got] = recorder.requests
    assert got.body == body
    assert got.headers["content-length"] == str(len(body))


@pytest.mark.parametrize("client_id", [None, "req-413"])
async def test_a_body_over_the_wire_limit_gets_the_json_413(
    gateway_factory: Any, recorder: Recorder, client_id: str | None
) -> None:
    config = GatewayConfig(proxy=ProxyLimits(max_body_bytes=64 * 1024))
    gw = await gateway_factory(spec(recorder.address), config)
    body = gzip.compress(os.urandom(70 * 1024))
    extra = f"X-Request-Id: {client_id}\r\n" if client_id else ""
    request = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Encoding: gzip\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, headers, answer = await raw_exchange(gw.port, request)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer)["error"]["code"] == "body_too_large"
    assert headers["x-request-id"] == (client_id or headers["x-request-id"])
    assert headers["x-request-id"]
    # Refused on its declared length: the replica never heard of it.
    assert recorder.connections == 0


async def test_a_chunked_body_over_the_wire_limit_gets_the_json_413(
    gateway_factory: Any, recorder: Recorder
) -> None:
    config = GatewayConfig(proxy=ProxyLimits(max_body_bytes=64 * 1024))
    gw = await gateway_factory(spec(recorder.address), config)
    body = gzip.compress(os.urandom(100 * 1024))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    headers = {"Content-Encoding": "gzip", "X-Request-Id": "chunky"}
    async with gw.request("POST", HOST, "/v1/predict", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        assert resp.headers["X-Request-Id"] == "chunky"
        assert (await resp.json())["error"]["code"] == "body_too_large"
