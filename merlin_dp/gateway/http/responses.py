"""What the HTTP front writes: relayed answers, streamed heads and its own errors, as bytes.

When a replica's answer has arrived whole there is no need to decode its headers and
serialise them again: :func:`relay` keeps the raw header lines (minus hop-by-hop ones),
adds ours, and makes one :class:`Answer` written in one send. A streamed answer's head
is made by :func:`streamed_head`. The gateway's own errors (:func:`error_answer`, and
the ready-made ones the connection sends for requests it can't read) have the JSON body
of :mod:`merlin_dp.gateway.errors`.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

import httptools

from merlin_dp.gateway.errors import error_body

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES = {
    code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _REASONS.items()
}


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


def without_named(lines: list[bytes], connection: bytes) -> list[bytes]:
    """The header lines (``Name: value``) but those the peer named in Connection (they
    are hop-by-hop too)."""
    tokens = connection_tokens(connection)
    if not tokens:
        return lines
    return [line for line in lines if line.split(b":", 1)[0].strip().lower() not in tokens]


class Answer:
    """An answer made whole: its status, its bytes on the wire (empty when it was
    streamed out already), the body alone for the mirror's comparison (None when it
    streamed), and whether the connection closes after it."""

    __slots__ = ("body", "close", "data", "status")

    def __init__(self, status: int, data: bytes, body: bytes | None, close: bool) -> None:
        self.status = status
        self.data = data
        self.body = body
        self.close = close


def status_line(status: int, http10: bool = False) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return b"HTTP/1.0" + line[8:] if http10 else line


def connection_line(keep_alive: bool, http10: bool) -> bytes:
    """What the answer says about the connection (HTTP/1.0 keeps it only when told)."""
    if not keep_alive:
        return b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if http10 else b""


_date: tuple[int, bytes] = (0, b"")


def date_line() -> bytes:
    """``Date`` for the gateway's own answers (RFC 9110 §6.6.1), made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
    return _date[1]


def error_answer(
    status: int,
    message: str,
    *,
    request_id: bytes | None = None,
    code: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    close: bool = False,
    http10: bool = False,
    keep_alive: bool = True,
) -> Answer:
    """The gateway's own answer: its JSON error, with our headers."""
    body = error_body(status, message, code)
    parts = [
        status_line(status, http10),
        date_line(),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
    ]
    if headers:
        parts.extend(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers)
    if request_id is not None:
        parts.append(b"X-Request-Id: " + request_id + b"\r\n")
    close = close or not keep_alive
    parts.append(connection_line(not close, http10))
    parts.append(b"\r\n")
    parts.append(body)
    return Answer(status, b"".join(parts), None, close)


def _raw_error(status: int, message: str) -> bytes:
    """A whole error answer that closes the connection, for where no request exists."""
    return error_answer(status, message, close=True).data.replace(date_line(), b"")


def malformed(exc: httptools.HttpParserError) -> bytes:
    """The answer to bytes llhttp refused (what it says is safe to repeat: no input)."""
    return _raw_error(400, f"malformed request: {exc}")


HEAD_TIMEOUT = _raw_error(408, "the request head did not arrive in time")
REFUSED = _raw_error(503, "too many open connections to this gateway")
INTERNAL_ERROR = _raw_error(500, "internal gateway error")
BAD_HOST = _raw_error(400, "a request needs exactly one Host header")


def line_too_long(limit: int) -> bytes:
    return _raw_error(414, f"request line over {limit} bytes")


def head_too_large(limit: int, headers: int, field: int) -> bytes:
    return _raw_error(
        431,
        f"request head over {limit} bytes, over {headers} header lines "
        f"or with a line over {field} bytes",
    )


def bad_version(version: str) -> bytes:
    if version[:1].isdigit() and version >= "2":
        return _raw_error(505, f"HTTP/{version} is not supported: use HTTP/1.1")
    return _raw_error(400, f"HTTP/{version} is not served: use HTTP/1.1")


def _relayed_lines(kept: list[bytes], connection: bytes | None) -> bytes:
    """The replica's header lines we relay, CRLF-terminated."""
    if connection is not None and connection.lower() not in PLAIN_CONNECTION:
        kept = without_named(kept, connection)
    return b"\r\n".join(kept) + b"\r\n" if kept else b""


def streamed_head(
    status: int,
    kept: list[bytes],
    has_length: bool,
    connection: bytes | None,
    extra: bytes,
    keep_alive: bool,
    http10: bool,
    no_body: bool,
) -> tuple[bytes, bool, bool]:
    """The head of an answer whose body streams from the replica, as
    (head, chunked, keep_alive): a body without a length goes chunked to an HTTP/1.1
    client and ends with the connection for an HTTP/1.0 one. ``kept`` are the replica's
    lines to relay, ``connection`` its Connection header, ``extra`` our own lines."""
    framing = b""
    chunked = False
    if not has_length and not no_body and status >= 200 and status not in (204, 304):
        if http10:
            keep_alive = False
        else:
            chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
    head = (
        status_line(status, http10)
        + _relayed_lines(kept, connection)
        + extra
        + framing
        + connection_line(keep_alive, http10)
        + b"\r\n"
    )
    return head, chunked, keep_alive


def relay(
    status: int,
    kept: list[bytes],
    has_length: bool,
    connection: bytes | None,
    body: bytes,
    extra: bytes,
    keep_alive: bool,
    head_request: bool,
    http10: bool = False,
) -> Answer:
    """The answer from the replica's head (as :func:`streamed_head` takes it) and its
    whole body. A body the replica chunked, or ended by closing, gets a length."""
    head = status_line(status, http10) + _relayed_lines(kept, connection) + extra
    if not has_length and not head_request and status >= 200 and status not in (204, 304):
        head += b"Content-Length: %d\r\n" % len(body)
    if not keep_alive:
        head += b"Connection: close\r\n"
    elif http10:
        head += b"Connection: keep-alive\r\n"
    if head_request or not body:
        return Answer(status, head + b"\r\n", body, not keep_alive)
    return Answer(status, head + b"\r\n" + body, body, not keep_alive)
