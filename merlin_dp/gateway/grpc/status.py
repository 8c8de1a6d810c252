"""gRPC statuses and the header blocks that carry them (doc/PROTOCOL-HTTP2.md).

Shared by the proxied call (:mod:`merlin_dp.gateway.grpc.proxy`) and the calls the gateway answers
itself (:mod:`merlin_dp.gateway.grpc.health`).
"""

from __future__ import annotations

from urllib.parse import quote

from merlin_dp.gateway.h2.codec import encode_field

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

STATUS_200 = encode_field(b":status", b"200")
CONTENT_TYPE = encode_field(b"content-type", b"application/grpc")


def trailers_only(code: int, message: str, extra: bytes = b"") -> bytes:
    """A Trailers-Only response: one HEADERS frame with status and grpc-status."""
    block = STATUS_200 + CONTENT_TYPE + encode_field(b"grpc-status", str(code).encode())
    if message:
        # grpc-message is percent-encoded UTF-8 (doc/PROTOCOL-HTTP2.md).
        text = quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
        block += encode_field(b"grpc-message", text)
    return block + extra


def trailers(code: int, message: str) -> bytes:
    block = encode_field(b"grpc-status", str(code).encode())
    if message:
        block += encode_field(b"grpc-message", quote(message, safe=" ").encode())
    return block
