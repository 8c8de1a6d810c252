"""aiohttp's low-level server, with the gateway's JSON errors for bad requests.

We use ``aiohttp.web.Server`` (no Application, router or middleware on the hot path).
aiohttp answers requests it can't parse itself, in plain text; this module swaps in a
request handler whose ``handle_error`` answers with the gateway's JSON error body and
the status that fits (400 malformed, 414 request line too long, 431 header too large,
500 for a bug, without the trace).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_response

log = logging.getLogger("gateway")


class JsonErrorRequestHandler(RequestHandler):
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


class GatewayHttpServer(web.Server):
    """``web.Server`` whose connections answer bad requests with JSON errors."""

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return JsonErrorRequestHandler(self, loop=self._loop, **kwargs)
