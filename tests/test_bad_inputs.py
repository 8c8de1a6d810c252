"""Every bad input gets its status and a JSON error body; nothing leaks a trace."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from merlin_dp.common.net import free_port
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.http.proxy import ProxyLimits
from tests.conftest import model_endpoint, start_replicas, version


async def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP response by its Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return status, headers, body
    finally:
        writer.close()


@pytest.fixture
async def gw(gateway_factory: Any, replicas: Any) -> Any:
    (r1,) = await start_replicas(replicas, "v1")
    dead = f"127.0.0.1:{free_port()}"
    spec = {
        "version_endpoints": [
            version("fraud", "scorer", "1", [r1.address]),
            version("fraud", "scorer", "2", []),  # nothing ready
            version("fraud", "scorer", "3", [dead]),  # nothing listening
        ],
        "model_endpoints": [
            model_endpoint("fraud", "scorer", {"1": 100}, timeout_seconds=0.3),
            model_endpoint("fraud", "cold", {})
            | {"model": "cold", "rule": {"destinations": [{"version": "1", "weight": 100}]}},
        ],
    }
    spec["version_endpoints"].append(version("fraud", "cold", "1", []))
    config = GatewayConfig(
        proxy=ProxyLimits(max_body_bytes=1000, buffer_body_bytes=500), max_header_bytes=2048
    )
    return await gateway_factory(spec, config)


def req(method: str, path: str, host: str, extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n"
    return head.encode() + body


CASES = [
    ("unknown host", req("POST", "/v1/predict", "nope.fraud.localhost"), 404, "not_found"),
    ("unknown project", req("POST", "/v1/predict", "scorer.other.localhost"), 404, "not_found"),
    ("unknown path form", req("POST", "/serving/fraud/nope/v1/predict", "127.0.0.1"), 404,
     "not_found"),
    ("no ready replica", req("POST", "/v1/predict", "scorer-2.fraud.localhost"), 503,
     "unavailable"),
    ("model at zero replicas", req("POST", "/v1/predict", "cold.fraud.localhost"), 503,
     "unavailable"),
    ("upstream refuses every connect", req("POST", "/v1/predict", "scorer-3.fraud.localhost"),
     502, "bad_gateway"),
    ("upstream timeout", req("GET", "/sleep?s=2", "scorer.fraud.localhost"), 504,
     "upstream_timeout"),
    ("declared body over limit",
     req("POST", "/v1/predict", "scorer.fraud.localhost", "Content-Length: 5000\r\n"), 413,
     "body_too_large"),
    ("chunked body over limit",
     req("POST", "/count", "scorer.fraud.localhost", "Transfer-Encoding: chunked\r\n",
         b"".join(b"190\r\n" + b"x" * 400 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"),
     413, "body_too_large"),
    ("malformed request line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("bad header", b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Name: x\r\n\r\n", 400,
     "bad_request"),
    ("non-HTTP bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 50, 400,
     "bad_request"),
    ("both Content-Length and chunked",
     req("POST", "/v1/predict", "scorer.fraud.localhost",
         "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400,
     "bad_request"),
    ("header too large", req("GET", "/", "scorer.fraud.localhost", f"X-Big: {'a' * 5000}\r\n"),
     431, "headers_too_large"),
    ("request line too long", req("GET", "/" + "a" * 9000, "scorer.fraud.localhost"), 414,
     "uri_too_long"),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
    ("transfer coding other than chunked",
     req("POST", "/v1/predict", "scorer.fraud.localhost", "Transfer-Encoding: gzip, chunked\r\n",
         b"0\r\n\r\n"), 501, "not_implemented"),
    ("Transfer-Encoding in HTTP/1.0",
     b"POST /v1/predict HTTP/1.0\r\nHost: scorer.fraud.localhost\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    ("CONNECT", b"CONNECT scorer.fraud.localhost:443 HTTP/1.1\r\n"
     b"Host: scorer.fraud.localhost:443\r\n\r\n", 405, "method_not_allowed"),
    ("TRACE", req("TRACE", "/v1/predict", "scorer.fraud.localhost"), 405, "method_not_allowed"),
    ("OPTIONS *", req("OPTIONS", "*", "scorer.fraud.localhost"), 400, "bad_request"),
    ("absolute-form with userinfo",
     req("GET", "http://me@scorer.fraud.localhost/v1/predict", "scorer.fraud.localhost"), 400,
     "bad_request"),
    ("absolute-form, not http", req("GET", "ftp://scorer.fraud.localhost/x", "a"), 400,
     "bad_request"),
    ("path above the root", req("GET", "/v1/../../x", "scorer.fraud.localhost"), 400,
     "bad_request"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input(gw: Any, name: str, data: bytes, status: int, code: str) -> None:
    got, headers, body = await raw_exchange(gw.port, data)
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in body.decode()
    if status == 503:
        assert headers["retry-after"] == "1"


async def test_gateway_keeps_serving_after_bad_inputs(gw: Any) -> None:
    for _, data, _, _ in CASES:
        await raw_exchange(gw.port, data)
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", data=b"{}") as resp:
        assert resp.status == 200
    metrics = gw.worker.metrics.snapshot()
    assert metrics["unrouted"]["404"] == 3
