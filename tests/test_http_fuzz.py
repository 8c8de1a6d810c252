"""Parser fuzz of the HTTP front: hypothesis writes streams of requests, valid and broken,
in random pieces, to a real gateway process in front of a recording replica.

Whatever the bytes, the gateway must not crash (a fresh request is served after each
example), hang (once the client stops sending, the connection ends within seconds), or
desync: every answer the client reads is either the gateway's own JSON error or the
replica's answer to the next request the replica received from this connection, in
order; nothing the gateway refused reaches the replica; and after an answer that closes
the connection nothing more is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtests.differential import Recorder, Seen
from loadtests.harness.processes import managed_processes
from loadtests.harness.routes import write_route_file
from loadtests.harness.systems import start_gateway
from merlin_dp.common.net import LOOPBACK, free_ports

HOST = b"scorer-1.fraud.localhost"
READ_SECONDS = 5.0


class Gateway:
    """A gateway process in front of a recorder served by a thread's event loop."""

    def __init__(self, port: int, log: list[Seen]) -> None:
        self.port = port
        self.log = log


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    log: list[Seen] = []
    upstream_port, port, admin_port = free_ports(3)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: Recorder(log), LOOPBACK, upstream_port)
        )
        started.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    routes = write_route_file(
        {
            "version_endpoints": [
                {"project": "fraud", "model": "scorer", "version": "1",
                 "replicas": [f"{LOOPBACK}:{upstream_port}"], "container_concurrency": 0}
            ],
            "model_endpoints": [],
        },
        workdir / "routes.yaml",
    )  # fmt: skip
    with managed_processes() as procs:
        proc = start_gateway(
            procs, routes, port=port, admin_port=admin_port, workdir=workdir, cpus=None,
            extra_args=["--header-timeout", "2"],
        )  # fmt: skip
        yield Gateway(port, log)
        proc.check_alive("gateway")
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


# --- what hypothesis writes -----------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                min_size=1, max_size=12)  # fmt: skip
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=30)
# Bytes that matter to a parser, for mutations.
SHARP = [b"\r", b"\n", b" ", b"\t", b":", b"\x00", b"0", b"-", b";", b",", b"\r\n", b"\xff"]


@st.composite
def one_request(draw: st.DrawFn, case: str) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    lines = [f"{method} /{draw(PATH)} HTTP/1.1", f"Host: {HOST.decode()}", f"X-Case: {case}"]
    lines += [f"X-{n}: {v}" for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))]
    body = draw(st.binary(max_size=600))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "none" or (not body and framing == "length"):
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    lines.append("Transfer-Encoding: chunked")
    size = draw(st.integers(1, 200))
    chunks = b"".join(
        b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunks + b"0\r\n\r\n"


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(SHARP) | st.binary(min_size=1, max_size=3))
        if how == "insert":
            data = data[:at] + piece + data[at:]
        elif how == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 4)) :]
        else:
            data = data[:at] + piece + data[at + len(piece) :]
    return data


@st.composite
def stream(draw: st.DrawFn) -> list[bytes]:
    """A connection's bytes: a few requests, some mutated, cut into pieces."""
    data = b""
    for i in range(draw(st.integers(1, 4))):
        request = draw(one_request(f"r{i}"))
        if draw(st.booleans()):
            request = draw(mutated(request))
        data += request
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [p for p in pieces if p]


# --- the client -----------------------------------------------------------------------


class Answers:
    """Answers off one connection, parsed as they come."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.list: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.list.append((self.parser.get_status_code(), self.headers, self.body))


def converse(port: int, pieces: list[bytes]) -> tuple[Answers, bool]:
    """Write the pieces (a moment apart, so that they arrive in separate reads), read the
    answers until a pause, stop sending, and read until the gateway closes; False if it
    didn't within READ_SECONDS."""
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answers = Answers()
    try:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the gateway closed after refusing: what it answered is read below
            time.sleep(0.002)
        sock.settimeout(0.05)  # the answers to what was whole
        if not _read(sock, answers, READ_SECONDS):
            return answers, True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(READ_SECONDS)
        return answers, not _read(sock, answers, READ_SECONDS)
    finally:
        sock.close()


def _read(sock: socket.socket, answers: Answers, seconds: float) -> bool:
    """Read until the socket's timeout passes in silence (True) or the gateway closes
    (False); True also when ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        if not chunk:
            return False
        answers.parser.feed_data(chunk)
    return True


def fresh_request_served(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=READ_SECONDS) as sock:
        sock.sendall(b"GET /alive HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got.startswith(b"HTTP/1.1 200 ")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)  # fmt: skip
@given(pieces=stream())
def test_no_crash_no_hang_no_desync(gateway: Gateway, pieces: list[bytes]) -> None:
    gateway.log.clear()
    answers, closed = converse(gateway.port, pieces)
    assert closed, "the gateway kept the connection open after the client stopped sending"
    time.sleep(0.005)  # the recorder's thread has logged what it received
    seen = [{"method": s.method, "target": s.target, "body_bytes": len(s.body)}
            for s in list(gateway.log)]  # fmt: skip
    relayed = [json.loads(body) for status, _, body in answers.list if status == 200]
    # In order, one for one: the replica's answers are to what it received, and nothing
    # reached it that the client got no answer to (but the last, cut by the close).
    assert relayed == seen[: len(relayed)], (relayed, seen)
    assert len(seen) - len(relayed) <= 1, (relayed, seen)
    for status, _, body in answers.list:
        if status != 200:
            assert status >= 400 and b'"error"' in body, (status, body)
    for i, (_, headers, _) in enumerate(answers.list):
        if headers.get(b"connection", b"").lower() == b"close":
            assert i == len(answers.list) - 1, "answers after one that closed"
    assert fresh_request_served(gateway.port)
