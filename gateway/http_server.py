"""aiohttp's low-level server, with the gateway's JSON errors for bad requests.

We use ``aiohttp.web.Server`` (no Application, router or middleware on the hot path).
aiohttp answers requests it can't parse itself, in plain text; this module swaps in a
request handler whose ``handle_error`` answers with the gateway's JSON error body and
the status that fits (400 malformed, 414 request line too long, 431 header too large,
500 for a bug, without the trace).

It also guards against abusive clients aiohttp leaves alone:

- a request head must arrive whole within ``header_timeout`` of its first byte, else
  408 and close (slowloris: aiohttp only bounds a connection that sends nothing);
- at most ``max_connections`` open connections per worker: past it a new connection is
  answered 503 and closed at once, so idle sockets can't exhaust memory or descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_body, error_response
from gateway.metrics import ConnectionStats

log = logging.getLogger("gateway")


class JsonErrorRequestHandler(RequestHandler):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager: Any = self._manager
        super().connection_made(transport)
        if len(manager._connections) > manager.max_connections:
            manager.stats.refused += 1
            if self.transport is not None:
                self.transport.write(REFUSED)
            self.force_close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes came, yet no whole request head: the head's clock starts (once).
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._head_timer is None:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.transport is None:
            return  # the head arrived (or the connection went) meanwhile
        manager: Any = self._manager
        manager.stats.head_timeouts += 1
        self.transport.write(HEAD_TIMEOUT)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            log.error("error handling request to %s", request.path, exc_info=exc)
            text = "internal gateway error"
        else:
            log.debug("bad request: %s", exc)
            status, text = describe_bad_request(status, exc)
        return error_response(status, text, close=True)


def describe_bad_request(status: int, exc: BaseException | None) -> tuple[int, str]:
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        line = line.encode("latin-1", "replace") if isinstance(line, str) else line
        if line.startswith((b"/", b"http")):
            return 414, "request line is too long"
        return 431, "a request header is too large"
    if isinstance(exc, BadHttpMessage):
        detail = str(exc.message or "").strip().splitlines()
        return 400, "malformed HTTP request" + (f": {detail[0][:200]}" if detail else "")
    return status, "malformed HTTP request"


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole error response as bytes, for where no request object exists."""
    body = error_body(status, message)
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


HEAD_TIMEOUT = _raw_error(408, "Request Timeout", "the request head did not arrive in time")
REFUSED = _raw_error(503, "Service Unavailable", "too many open connections to this gateway")


class GatewayHttpServer(web.Server):
    """``web.Server`` whose connections answer bad requests with JSON errors and are
    guarded against slow heads and connection floods."""

    def __init__(
        self,
        *args: Any,
        stats: ConnectionStats,
        header_timeout: float = 10.0,
        max_connections: int = 10_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.header_timeout = header_timeout
        self.max_connections = max_connections

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.stats.open = len(self._connections)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.stats.open = len(self._connections)

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return JsonErrorRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **kwargs
        )
