"""Bad requests to an aiohttp server, and the machine-readable error codes.

aiohttp answers requests it can't parse itself, before any handler runs, with a
plain-text page that repeats what it choked on. :class:`JsonErrorHandler` answers them
with the server's own JSON error instead (the status that fits: 400 malformed, 414
request line too long, 431 header too large; 500 for a bug, without the trace); the
controller's API says how its error body looks. :data:`REASONS` are the codes the API
and the gateway (whose HTTP front is its own) use for a status.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("merlin_dp")

REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "body_too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
    504: "upstream_timeout",
    505: "http_version_not_supported",
}


class JsonErrorHandler(RequestHandler):
    """A request handler that answers what aiohttp can't parse with the server's own
    JSON error (the status that fits; 500 without the trace), never aiohttp's plain-text
    page that repeats what it choked on. Subclasses say how their error looks."""

    __slots__ = ()

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
            self.error_log.error(
                "unexpected error answering %s %s", request.method, request.path, exc_info=exc
            )
            return self.json_error(500, None)
        self.error_log.debug("bad request: %s", exc)
        status, text = describe_bad_request(status, exc)
        return self.json_error(status, text)

    error_log = log

    def json_error(self, status: int, text: str | None) -> web.StreamResponse:
        """The answer, closing the connection; ``text`` None: an internal error."""
        raise NotImplementedError


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
