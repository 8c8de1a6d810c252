"""The same raw HTTP/1.1 requests through nginx ``proxy_pass`` and through the gateway,
each in front of a recording replica: where what the replica received, or what the
client got back, differ beyond the documented differences.

    python -m loadtests.differential [--cases N] [--seed S] [--show N]

It prints, per kind of request, how many cases agree, and the first differences of each
kind in full, and ends with ``RESULT differential agree=<n>/<n>``. The suite runs the same
comparison (``tests/test_differential.py``) and fails on any difference. The kinds:
methods, body sizes from 0 to 1 MiB (past the gateway's 256 KiB buffer, so they stream),
chunked bodies in pieces of 1 byte to 64 KiB with extensions and trailers, pipelined
requests, HTTP/1.0, odd but legal headers and targets, and malformed requests (the
request-smuggling shapes among them), each refused and the connection closed.

Both proxies get each case on a fresh connection; the replica (an asyncio server with an
httptools parser, in this process) records each request it receives — method, target,
headers in order, body — and answers ``200`` with a JSON body naming the method, the
target and the body's size. Compared, per case: the requests the replica saw (the case's ``X-Case``
header finds them) and the responses the client read (status; headers and body of
non-error answers). Not compared, by design: the response's ``Date``, ``Server``,
``Connection``, ``Keep-Alive``, ``X-Model-Version`` and ``X-Request-Id``; the request's
``X-Request-Id``, ``X-Forwarded-For``, ``Connection``; the framing of a forwarded body
(nginx buffers a chunked body and sends a ``Content-Length``); the order of a response's
headers of different names (nginx puts its own first; the gateway keeps the replica's);
and error answers' bodies (nginx's HTML page, the gateway's JSON).

Where the gateway is meant to differ, it is documented here and counted as agreeing only
when it differs exactly so:

- a head whose lines end in a bare LF, which nginx accepts, is refused with 400 and never
  forwarded (a request-smuggling shape): kinds marked ``STRICTER``;
- a Transfer-Encoding whose last coding is not chunked: 400 (RFC 9112 §6.3), nginx 501
  (``DOCUMENTED_STATUS``);
- a header the request's Connection header names is dropped (RFC 9110 §7.6.1); nginx
  forwards it (``DOCUMENTED_DROPPED``).
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
# Kinds where nginx and the gateway refuse with different statuses: (nginx, gateway).
# A Transfer-Encoding whose last coding is not chunked leaves the body's length unknown:
# RFC 9112 §6.3 says 400 and close, which the gateway does; nginx answers 501.
DOCUMENTED_STATUS: dict[str, tuple[int, int]] = {"TE chunked then gzip": (501, 400)}
# Kinds where the gateway drops a request header nginx forwards: a header the request's
# Connection header names is hop-by-hop (RFC 9110 §7.6.1); nginx ignores such names.
DOCUMENTED_DROPPED: dict[str, bytes] = {"Connection names a header": b"x-hop"}


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
        body = json.dumps(
            {"method": seen.method, "target": seen.target, "body_bytes": len(seen.body)}
        ).encode()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Replica: r1\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
        self.transport.write(head + (b"" if seen.method == "HEAD" else body))


# --- the client ------------------------------------------------------------------------------


class Reader:
    """Responses off one connection, as they come."""

    def __init__(self, heads: tuple[bool, ...]) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.heads = heads

    def on_message_begin(self) -> None:
        self.headers, self.body = [], b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        n = len(self.answers)
        if n < len(self.heads) and self.heads[n]:
            # A HEAD's answer has no body, which httptools can't be told: it is whole here
            # (a HEAD is only ever the last request of a case).
            self.answers.append(Answer(self.parser.get_status_code(), self.headers, b""))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        n = len(self.answers)
        if n >= len(self.heads) or not self.heads[n]:  # a HEAD's was taken at its head
            self.answers.append(Answer(self.parser.get_status_code(), self.headers, self.body))


async def send(port: int, data: bytes, heads: tuple[bool, ...]) -> tuple[list[Answer], bool]:
    """Send ``data`` on a new connection; read until an answer per ``heads``, the server
    closing, or ``READ_SECONDS`` of silence."""
    expected = len(heads)
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    parsed = Reader(heads)
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


# kind, id, bytes, and per answer expected: whether it answers a HEAD (no body follows)
Case = tuple[str, str, bytes, tuple[bool, ...]]


def chunked(body: bytes, size: int, extension: str = "", trailer: str = "") -> bytes:
    """``body`` in chunks of ``size`` bytes, each with ``extension``, then ``trailer``."""
    chunks = b"".join(
        f"{len(body[i : i + size]):x}{extension}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return chunks + b"0\r\n" + (trailer.encode() + b"\r\n" if trailer else b"") + b"\r\n"


def raw(lines: list[str], body: bytes = b"", eol: str = "\r\n") -> bytes:
    return (eol.join(lines) + eol + eol).encode("latin-1") + body


def cases(n: int, seed: int) -> list[Case]:
    """``n`` cases, a kind each in turn; bodies and sizes drawn from ``seed``."""
    rng = random.Random(seed)
    out: list[Case] = []
    kinds: list[tuple[str, Callable[[str], bytes], tuple[bool, ...]]] = []

    def add(kind: str, make: Callable[[str], bytes], heads: tuple[bool, ...] = (False,)) -> None:
        kinds.append((kind, make, heads))

    def body(size: int) -> bytes:
        return rng.randbytes(size)

    def head(c: str, *more: str, line: str = "POST /x HTTP/1.1") -> list[str]:
        return [line, f"Host: {HOST}", f"X-Case: {c}", *more]

    def plain(method: str) -> Callable[[str], bytes]:
        return lambda c: request(method, f"/v1/models/scorer-1?q={c}&x=%20y", c)

    def sized(size: int) -> Callable[[str], bytes]:
        return lambda c: request("POST", "/x", c, body=body(size))

    def pieces(size: int, piece: int) -> Callable[[str], bytes]:
        return lambda c: raw(head(c, "Transfer-Encoding: chunked"), chunked(body(size), piece))

    for method in ("GET", "DELETE", "OPTIONS"):
        add(method, plain(method))
    add("HEAD", lambda c: request("HEAD", "/x", c), (True,))
    for size in (0, 1, 100, 4096, 65536, 262144, 300000, 1048576):
        add(f"POST {size} bytes", sized(size))
    add("PUT empty", lambda c: request("PUT", "/x", c))
    add("PATCH json", lambda c: request("PATCH", "/x", c, ["Content-Type: application/json"],
                                        body=b'{"a": [1, 2, 3]}'))  # fmt: skip
    for size, piece in ((1, 1), (3000, 1000), (70000, 16384), (300000, 65536)):
        add(f"chunked {size} in {piece}", pieces(size, piece))
    add("chunked with extensions", lambda c: raw(head(c, "Transfer-Encoding: chunked"),
                                                 chunked(body(500), 100, ";name=v")))  # fmt: skip
    te = "Transfer-Encoding: chunked"
    add("chunked with a trailer", lambda c: raw(head(c, te), chunked(body(500), 200, "", "X: t")))
    add("odd legal headers", lambda c: request("GET", "/x", c, [
        "X-Empty:", "X-Twice: a", "X-Twice: b", "X-Tab: a\tb", "X-Long: " + "v" * 4000,
        "x-lower-case: 1", "X-Latin1: caf\u00e9", "X-Colon: a:b:c", "X-Spaces:   padded   ",
        "Cookie: a=1", "Cookie: b=2", "X-Quote: \"q\"", "X-Ws-Before:\tv"]))  # fmt: skip
    add("fifty headers", lambda c: request("GET", "/x", c, [f"X-H{i}: {i}" for i in range(50)]))
    add("odd legal target", lambda c: request("GET", "/a/%7Euser/b;p=1/?q=%E2%9C%93&r=a+b#", c))
    add("gzip body", lambda c: request("POST", "/x", c, ["Content-Encoding: gzip"],
                                       body=b"\x1f\x8b\x08\x00" + body(200)))  # fmt: skip
    add("pipelined pair", lambda c: request("GET", "/a", c) + request("POST", "/b", c,
                                                                      body=b"{}"),
        (False, False))  # fmt: skip
    add("pipelined four", lambda c: b"".join(
        request(m, f"/p{i}", c, body=body(i * 700) if m == "POST" else b"")
        for i, m in enumerate(("GET", "POST", "DELETE", "POST"))), (False,) * 4)  # fmt: skip
    add("pipelined chunked", lambda c: raw(head(c, "Transfer-Encoding: chunked"),
                                           chunked(body(2000), 300)) + request("GET", "/z", c),
        (False, False))  # fmt: skip
    add("HTTP/1.0", lambda c: raw(head(c, line="GET /x HTTP/1.0")))
    add("HTTP/1.0 keep-alive", lambda c: raw(head(c, "Connection: keep-alive",
                                                  line="GET /x HTTP/1.0")))  # fmt: skip
    add("HTTP/1.0 body", lambda c: raw(head(c, "Content-Length: 5", line="POST /x HTTP/1.0"),
                                       b"hello"))  # fmt: skip
    add("Connection names a header", lambda c: request("GET", "/x", c, [
        "Connection: keep-alive, X-Hop", "X-Hop: dropped", "X-Kept: kept"]))  # fmt: skip
    # Malformed: each is refused and the connection closed, nothing of it forwarded.
    add("CL and TE", lambda c: raw(head(c, "Content-Length: 5", "Transfer-Encoding: chunked"),
                                   b"0\r\n\r\n"))  # fmt: skip
    add("two CL", lambda c: raw(head(c, "Content-Length: 3", "Content-Length: 4"), b"abcd"))
    add("two equal CL", lambda c: raw(head(c, "Content-Length: 2", "Content-Length: 2"), b"ab"))
    add("bad chunk size", lambda c: raw(head(c, "Transfer-Encoding: chunked"),
                                        b"zz\r\nab\r\n0\r\n\r\n"))  # fmt: skip
    add("chunk size overflow", lambda c: raw(head(c, "Transfer-Encoding: chunked"),
                                             b"fffffffffffffffff1\r\nab\r\n0\r\n\r\n"))  # fmt: skip
    add("negative CL", lambda c: raw(head(c, "Content-Length: -1")))
    add("CL with a sign", lambda c: raw(head(c, "Content-Length: +2"), b"ab"))
    add("obs-fold", lambda c: raw(head(c, "X-Folded: a", " b", line="GET /x HTTP/1.1")))
    add("space before colon", lambda c: raw(head(c, "X-Bad : v", line="GET /x HTTP/1.1")))
    add("NUL in a value", lambda c: raw(head(c, "X-Nul: a\x00b", line="GET /x HTTP/1.1")))
    add("bare LF (STRICTER)", lambda c: raw(head(c, line="GET /x HTTP/1.1"), eol="\n"))
    add("two Host", lambda c: request("GET", "/x", c, [f"Host: other.{HOST}"]))
    add("no Host", lambda c: f"GET /x HTTP/1.1\r\nX-Case: {c}\r\n\r\n".encode())
    add("TE in HTTP/1.0", lambda c: raw(head(c, "Transfer-Encoding: chunked",
                                             line="POST /x HTTP/1.0"), b"0\r\n\r\n"))  # fmt: skip
    add("TE chunked then gzip", lambda c: raw(head(c, "Transfer-Encoding: chunked, gzip"),
                                              b"0\r\n\r\n"))  # fmt: skip
    add("TE gzip then chunked (501)", lambda c: raw(head(c, "Transfer-Encoding: gzip, chunked"),
                                                    b"0\r\n\r\n"))  # fmt: skip
    add("HTTP/2.0 line", lambda c: raw(head(c, line="GET /x HTTP/2.0")))
    add("URI over 8 KiB", lambda c: raw(head(c, line="GET /" + "u" * 9000 + " HTTP/1.1")))
    add("bad after good", lambda c: request("GET", "/ok", c) + b"GARBAGE\r\n\r\n", (False, False))
    for i in range(n):
        kind, make, heads = kinds[i % len(kinds)]
        case = f"c{i}"
        out.append((kind, case, make(case), heads))
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


@dataclass
class Report:
    """Per kind of case: how many were sent, how many agreed, and the first differences."""

    sent: Counter[str] = field(default_factory=Counter)
    agree: Counter[str] = field(default_factory=Counter)
    differences: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    @property
    def agreed(self) -> int:
        return sum(self.agree.values())

    def table(self) -> str:
        width = max(map(len, self.sent))
        return "\n".join(f"{kind:<{width}}  {self.agree[kind]:>5}/{n} agree"
                         for kind, n in self.sent.items())  # fmt: skip


async def compare(n: int, seed: int, procs: ProcessSet, workdir: Path, show: int = 1) -> Report:
    """Send ``n`` cases through nginx and the gateway, both in front of one recorder."""
    tools = ensure_tools(["nginx"])
    log: list[Seen] = []
    upstream_port, nginx_port, gateway_port, admin_port = free_ports(4)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Recorder(log), LOOPBACK, upstream_port)
    report = Report()
    shown: Counter[str] = Counter()
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
        for kind, case, data, heads in cases(n, seed):
            outcomes = []
            for port in (nginx_port, gateway_port):
                log.clear()
                answers, closed = await send(port, data, heads)
                await asyncio.sleep(0)
                seen = [s for s in log if (b"X-Case", case.encode()) in s.headers]
                outcomes.append(canonical(Outcome(answers, seen, closed)))
            report.sent[kind] += 1
            if agree(kind, outcomes[0], outcomes[1]):
                report.agree[kind] += 1
            elif shown[kind] < show:
                shown[kind] += 1
                report.differences.append(
                    f"{kind} ({case}):\n    {difference(outcomes[0], outcomes[1])}"
                )
    finally:
        server.close()
    return report


def agree(kind: str, nginx: dict[str, Any], gateway: dict[str, Any]) -> bool:
    """Whether the outcomes agree, with the documented differences allowed."""
    if "STRICTER" in kind:
        return gateway == {"answers": [{"status": 400}], "seen": []}
    dropped = DOCUMENTED_DROPPED.get(kind)
    if dropped is not None:
        for seen in nginx["seen"]:
            seen["headers"] = [(k, v) for k, v in seen["headers"] if k != dropped]
    documented = DOCUMENTED_STATUS.get(kind)
    if documented is not None:
        want = {"answers": [{"status": documented[0]}], "seen": []}
        return nginx == want and gateway == {**want, "answers": [{"status": documented[1]}]}
    return nginx == gateway


async def run(args: argparse.Namespace, procs: ProcessSet, workdir: Path) -> int:
    report = await compare(args.cases, args.seed, procs, workdir, args.show)
    for text in report.differences:
        print(text)
    print()
    print(report.table())
    print(f"RESULT differential agree={report.agreed}/{report.total}")
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
