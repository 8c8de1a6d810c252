"""aiohttp's server for the controller's API, with the API's JSON errors for requests
aiohttp can't parse.

aiohttp answers those itself, before any middleware runs, with a plain-text page that
repeats what it choked on: a header over the size limit, e.g. an oversized bearer token,
came back to the sender in the page. :class:`ApiRunner` serves the app through a request
handler that answers ``{"error": {"code", "message", "fields"}}`` instead, with the
status that fits (400 malformed, 414 request line too long, 431 header too large, 500
without the trace) and nothing of the request in it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from merlin_dp.common.web import REASONS, JsonErrorHandler
from merlin_dp.controller.api import error

log = logging.getLogger("merlin_dp.controller.api")


class _ApiRequestHandler(JsonErrorHandler):
    __slots__ = ()
    error_log = log

    def json_error(self, status: int, text: str | None) -> web.StreamResponse:
        if text is None:
            resp = error(500, "internal_error", "internal controller error")
        else:
            resp = error(status, REASONS.get(status, "bad_request"), text)
        resp.force_close()
        return resp


class _ApiServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests with JSON."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _ApiServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
