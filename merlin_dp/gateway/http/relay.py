"""A response relayed as bytes: the replica's head and body, written in one send.

When a replica's answer has arrived whole and the client speaks HTTP/1.1, there is no
need to decode its headers into a multidict and serialise them again: we keep the raw
header lines (minus hop-by-hop ones), add ours, and hand aiohttp an object whose
``prepare`` writes the joined bytes to the client's transport. aiohttp's connection
handler only calls ``prepare``, ``write_eof`` and reads ``keep_alive`` on a response;
everything else (HTTP/1.0 clients, streamed bodies, our own errors) uses aiohttp's
regular responses.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

# RFC 9110 §7.6.1 hop-by-hop fields, plus the ones we set ourselves.
RESPONSE_SKIP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"x-model-version", b"x-request-id",
    }
)  # fmt: skip
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


# Framing and the fields we set ourselves: a peer can't make them hop-by-hop by naming
# them in Connection (dropping Content-Length while forwarding the body would smuggle it).
PROTECTED = frozenset(
    {b"close", b"keep-alive", b"", b"content-length", b"host", b"x-request-id", b"x-forwarded-for"}
)


# What nearly every peer sends: nothing to drop, so no need to look.
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def connection_tokens(connection: bytes) -> set[bytes]:
    """Field names a Connection header makes hop-by-hop, minus the ones we protect."""
    return {t.strip().lower() for t in connection.split(b",")} - PROTECTED


def drop_connection_tokens(lines: list[bytes], connection: bytes) -> list[bytes]:
    """Remove header lines the peer named in Connection (they are hop-by-hop too).

    ``lines[0]`` is the start line and stays.
    """
    tokens = connection_tokens(connection)
    if not tokens:
        return lines
    return [
        line
        for i, line in enumerate(lines)
        if i == 0 or line.split(b":", 1)[0].strip().lower() not in tokens
    ]


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode()


class RelayedResponse(web.StreamResponse):
    """Pre-serialised response bytes. Deliberately skips StreamResponse's set-up: only
    the members aiohttp's connection handler touches are provided."""

    def __init__(self, status: int, data: bytes, payload: bytes, keep_alive: bool) -> None:
        # No super().__init__(): that builds the header multidict we exist to avoid.
        self._relay_status = status
        self._data = data
        self.payload = payload  # the body alone, for the mirror's comparison
        self._keep_alive = keep_alive

    @property
    def status(self) -> int:
        return self._relay_status

    async def prepare(self, request: BaseRequest) -> Any:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        transport.write(self._data)
        # Honour backpressure: a client that pipelines and never reads must not make us
        # buffer without bound (a no-op unless the transport paused writing).
        await request.writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def relay(
    status: int,
    raw_headers: list[tuple[bytes, bytes]],
    body: bytes,
    extra: bytes,
    keep_alive: bool,
    head_request: bool,
) -> RelayedResponse:
    """Build the HTTP/1.1 response from the replica's head and body.

    ``extra`` holds our own header lines (already CRLF-terminated).
    """
    parts = [status_line(status)]
    append = parts.append
    has_length = False
    connection = None
    for name, value in raw_headers:
        lname = name.lower()
        if lname in RESPONSE_SKIP:
            if lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lname == b"content-length":
            has_length = True
        append(name + b": " + value + b"\r\n")
    if connection is not None and connection.lower() not in PLAIN_CONNECTION:
        parts = drop_connection_tokens(parts, connection)
        append = parts.append
    append(extra)
    if not has_length and not head_request and status >= 200 and status not in (204, 304):
        # The replica chunked it or closed to end it; we send it whole with a length.
        append(b"Content-Length: %d\r\n" % len(body))
    if not keep_alive:
        append(b"Connection: close\r\n")
    append(b"\r\n")
    if body and not head_request:
        append(body)
    return RelayedResponse(status, b"".join(parts), body, keep_alive)
