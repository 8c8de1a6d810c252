"""The same raw HTTP/1.1 requests through nginx ``proxy_pass`` and through the gateway,
each in front of a recording replica: where what the replica received, or what the
client got back, differ beyond the documented differences.

    python -m loadtests.differential [--cases N] [--seed S] [--show N]

A diagnostic for the HTTP front (the first step of the differential test issue 19 asks
for): it prints, per kind of request, how many cases agree, and the first differences of
each kind in full. It asserts nothing and ends with ``RESULT differential agree=<n>/<n>``.

Both proxies get each case on a fresh connection; the replica (an asyncio server with an
httptools parser, in this process) records each request it receives — method, target,
headers in order, body — and answers ``200`` with a JSON body naming the method and the
body's size. Compared, per case: the requests the replica saw (the case's ``X-Case``
header finds them) and the responses the client read (status; headers and body of
non-error answers). Not compared, by design: the response's ``Date``, ``Server``,
``Connection``, ``Keep-Alive``, ``X-Model-Version`` and ``X-Request-Id``; the request's
``X-Request-Id``, ``X-Forwarded-For``, ``Connection``; the framing of a forwarded body
(nginx buffers a chunked body and sends a ``Content-Length``); the order of a response's
headers of different names (nginx puts its own first; the gateway keeps the replica's);
and error answers' bodies (nginx's HTML page, the gateway's JSON).

Where the gateway is meant to differ, the kind says so (``STRICTER``): a head whose lines
end in a bare LF, which nginx accepts, is refused with 400 and never forwarded (a
request-smuggling shape; issue 19). Those count as agreeing when the gateway refused and
forwarded nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httptools

from loadtests.harness.processes import ProcessSet, managed_processes
from loadtests.harness.routes import write_route_file
from loadtests.harness.systems import start_gateway, start_nginx
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import LOOPBACK, free_ports

HOST = "scorer-1.fraud.localhost"
IGNORED_RESPONSE = {b"date", b"server", b"connection", b"keep-alive", b"x-model-version",
                    b"x-request-id"}  # fmt: skip
IGNORED_REQUEST = {b"x-request-id", b"x-forwarded-for", b"connection", b"content-length",
                   b"transfer-encoding"}  # fmt: skip
READ_SECONDS = 2.0


@dataclass
class Seen:
    """A request as the replica received it."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Outcome:
    answers: list[Answer] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    closed: bool = False


# --- the recording replica -----------------------------------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self, log: list[Seen]) -> None:
        self.log = log
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Seen | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.current = Seen(self.parser.get_method().decode(), self.url.decode("latin-1"),
                            self.headers)  # fmt: skip

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        seen = self.current
        assert seen is not None and self.transport is not None
        self.log.append(seen)
        body = json.dumps({"method": seen.method, "body_bytes": len(seen.body)}).encode()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Replica: r1\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
        self.transport.write(head + (b"" if seen.method == "HEAD" else body))


# --- the client ------------------------------------------------------------------------------


class Reader:
    """Responses off one connection, as they come."""

    def __init__(self, head_request: bool) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.head_request = head_request

    def on_message_begin(self) -> None:
        self.headers, self.body = [], b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> bool | None:
        return True if self.head_request else None  # a HEAD answer has no body

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self.headers, self.body))


async def send(port: int, data: bytes, head: bool, expected: int) -> tuple[list[Answer], bool]:
    """Send ``data`` on a new connection; read until ``expected`` answers, the server
    closing, or ``READ_SECONDS`` of silence."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    parsed = Reader(head)
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), READ_SECONDS)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            try:
                parsed.parser.feed_data(chunk)
            except httptools.HttpParserError:
                break
            if len(parsed.answers) >= expected:
                break
    finally:
        writer.close()
    return parsed.answers, closed


# --- the cases -------------------------------------------------------------------------------


def request(method: str, path: str, case: str, headers: list[str] | None = None,
            body: bytes = b"", framing: str = "length") -> bytes:  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"X-Case: {case}"]
    lines += headers or []
    if framing == "length" and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body)}")
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        chunks = b"".join(f"{len(body[i:i + 1000]):x}\r\n".encode() + body[i:i + 1000] + b"\r\n"
                          for i in range(0, len(body), 1000)) + b"0\r\n\r\n"  # fmt: skip
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunks
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


Case = tuple[str, str, bytes, bool, int]  # kind, id, bytes, a HEAD request, requests in it


def cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out: list[Case] = []
    kinds: list[tuple[str, Callable[[str], bytes]]] = []

    def add(kind: str, make: Callable[[str], bytes]) -> None:
        kinds.append((kind, make))

    def body(size: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(size))

    add("GET", lambda c: request("GET", f"/v1/models/scorer-1?q={c}", c))
    add("POST small", lambda c: request("POST", "/v1/models/scorer-1:predict", c,
                                        body=b'{"instances": [[1, 2]]}'))  # fmt: skip
    add("POST binary 64 KiB", lambda c: request("POST", "/x", c, body=body(65536)))
    add("POST chunked", lambda c: request("POST", "/x", c, body=body(3000), framing="chunked"))
    add("PUT empty", lambda c: request("PUT", "/x", c))
    add("DELETE", lambda c: request("DELETE", "/items/1", c))
    add("HEAD", lambda c: request("HEAD", "/x", c))
    add("odd legal headers", lambda c: request("GET", "/x", c, [
        "X-Empty:", "X-Twice: a", "X-Twice: b", "X-Tab: a\tb", "X-Long: " + "v" * 4000,
        "x-lower-case: 1", "X-UTF8: caf\u00e9".encode().decode("latin-1")]))  # fmt: skip
    add("gzip body", lambda c: request("POST", "/x", c, ["Content-Encoding: gzip"],
                                       body=b"\x1f\x8b\x08\x00" + body(200)))  # fmt: skip
    add("pipelined pair", lambda c: request("GET", "/a", c) + request("POST", "/b", c,
                                                                      body=b"{}"))  # fmt: skip
    add("HTTP/1.0", lambda c: f"GET /x HTTP/1.0\r\nHost: {HOST}\r\nX-Case: {c}\r\n\r\n".encode())
    # Malformed: each should be refused (400) and the connection closed, nothing forwarded.
    add("CL and TE", lambda c: request("POST", "/x", c, ["Content-Length: 5"], b"0\r\n\r\n",
                                       framing="chunked"))  # fmt: skip
    add("two CL", lambda c: request("POST", "/x", c, ["Content-Length: 3"], b"abcd"))
    add("bad chunk size", lambda c: (f"POST /x HTTP/1.1\r\nHost: {HOST}\r\nX-Case: {c}\r\n"
                                     "Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
                                     ).encode())  # fmt: skip
    add("obs-fold", lambda c: (f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nX-Case: {c}\r\n"
                               "X-Folded: a\r\n b\r\n\r\n").encode())  # fmt: skip
    add("bare LF (STRICTER)", lambda c: f"GET /x HTTP/1.1\nHost: {HOST}\nX-Case: {c}\n\n".encode())
    add("two Host", lambda c: request("GET", "/x", c, [f"Host: other.{HOST}"]))
    for i in range(n):
        kind, make = kinds[i % len(kinds)]
        case = f"c{i}"
        out.append((kind, case, make(case), kind == "HEAD", 2 if "pipelined" in kind else 1))
    return out


# --- comparing --------------------------------------------------------------------------------


def canonical(outcome: Outcome) -> dict[str, Any]:
    answers: list[dict[str, Any]] = []
    for a in outcome.answers:
        if a.status >= 400:
            answers.append({"status": a.status})
            continue
        # nginx puts its own framing headers first; the order of different names is not
        # compared (that of one name's several values is: sorted() is stable).
        headers = sorted(((k.lower(), v) for k, v in a.headers
                          if k.lower() not in IGNORED_RESPONSE), key=lambda kv: kv[0])  # fmt: skip
        answers.append({"status": a.status, "headers": headers, "body": a.body})
    seen = [{"method": s.method, "target": s.target, "body": s.body,
             "headers": [(k.lower(), v) for k, v in s.headers
                         if k.lower() not in IGNORED_REQUEST]}
            for s in outcome.seen]  # fmt: skip
    return {"answers": answers, "seen": seen}


def difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    parts = []
    for key in ("answers", "seen"):
        if a[key] != b[key]:
            parts.append(f"{key}: nginx {_short(a[key])}\n      gateway {_short(b[key])}")
    return "\n    ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 600 else text[:600] + "…"


async def run(args: argparse.Namespace, procs: ProcessSet, workdir: Path) -> int:
    tools = ensure_tools(["nginx"])
    log: list[Seen] = []
    upstream_port, nginx_port, gateway_port, admin_port = free_ports(4)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Recorder(log), LOOPBACK, upstream_port)
    try:
        upstream = f"{LOOPBACK}:{upstream_port}"

        def conf(prefix: Path) -> str:
            from loadtests.harness.systems import nginx_proxy_conf

            return nginx_proxy_conf(prefix, nginx_port, upstream).replace(
                'proxy_set_header Connection "";',
                'proxy_set_header Connection ""; proxy_set_header Host $http_host;',
            )

        await asyncio.to_thread(start_nginx, procs, "nginx", conf, nginx_path=tools["nginx"],
                                port=nginx_port, workdir=workdir, cpus=None)  # fmt: skip
        routes = write_route_file({
            "version_endpoints": [{"project": "fraud", "model": "scorer", "version": "1",
                                   "replicas": [upstream], "container_concurrency": 0}],
            "model_endpoints": [],
        }, workdir / "routes.yaml")  # fmt: skip
        await asyncio.to_thread(start_gateway, procs, routes, port=gateway_port,
                                admin_port=admin_port, workdir=workdir, cpus=None)  # fmt: skip
        by_kind: Counter[str] = Counter()
        agree: Counter[str] = Counter()
        shown: Counter[str] = Counter()
        for kind, case, data, head, expected in cases(args.cases, args.seed):
            outcomes = []
            for port in (nginx_port, gateway_port):
                log.clear()
                answers, closed = await send(port, data, head, expected)
                await asyncio.sleep(0)
                seen = [s for s in log if (b"X-Case", case.encode()) in s.headers]
                outcomes.append(canonical(Outcome(answers, seen, closed)))
            by_kind[kind] += 1
            if "STRICTER" in kind:
                refused = {"answers": [{"status": 400}], "seen": []}
                outcomes[0] = refused if outcomes[1] == refused else outcomes[0]
            if outcomes[0] == outcomes[1]:
                agree[kind] += 1
            elif shown[kind] < args.show:
                shown[kind] += 1
                print(f"{kind} ({case}):\n    {difference(outcomes[0], outcomes[1])}")
    finally:
        server.close()
    width = max(map(len, by_kind))
    print()
    for kind, n in by_kind.items():
        print(f"{kind:<{width}}  {agree[kind]:>5}/{n} agree")
    total, same = sum(by_kind.values()), sum(agree.values())
    print(f"RESULT differential agree={same}/{total}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.differential",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--cases", type=int, default=340, help="cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed (default: %(default)s)")
    parser.add_argument("--show", type=int, default=1,
                        help="differences shown per kind (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, through the block that stops nginx and the gateway.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="differential-") as tmp, \
                managed_processes() as procs:  # fmt: skip
            return asyncio.run(run(args, procs, Path(tmp)))
    except KeyboardInterrupt:
        print("differential: interrupted; processes stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    raise SystemExit(main())
