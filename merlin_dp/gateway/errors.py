"""The gateway's own error responses: JSON, the right status, never a stack trace.

Every answer the gateway makes itself (rather than relaying a replica's) has the body
``{"error": {"code": ..., "message": ...}}``; the code is a stable, machine-readable
word, the message is for people.
"""

from __future__ import annotations

import json

from aiohttp import web

from merlin_dp.common.web import REASONS


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    payload = {"error": {"code": code or REASONS.get(status, "error"), "message": message}}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> web.Response:
    extra = dict(headers or {})
    if retry_after is not None:
        extra["Retry-After"] = str(retry_after)
    resp = web.Response(
        status=status,
        body=error_body(status, message, code),
        content_type="application/json",
        headers=extra,
    )
    if close:
        resp.force_close()
    return resp
