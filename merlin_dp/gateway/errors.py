"""The gateway's own error bodies: JSON, the right status, never a stack trace.

Every answer the gateway makes itself (rather than relaying a replica's) has the body
``{"error": {"code": ..., "message": ...}}``; the code is a stable, machine-readable
word, the message is for people. And :class:`ClientGone`, how the front tells the proxy
that a client left mid-request (here, not beside the request, because it subclasses a
built-in exception, which the compiled hot path's classes can't: docs/architecture.md).
"""

from __future__ import annotations

import json

from merlin_dp.common.web import REASONS


class ClientGone(ConnectionError):
    """The client closed its connection before its request was over."""


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    payload = {"error": {"code": code or REASONS.get(status, "error"), "message": message}}
    return json.dumps(payload, separators=(",", ":")).encode()
