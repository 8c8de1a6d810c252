"""What a gRPC request's header block says, read once per distinct block.

:class:`RequestHead` is derived from a decoded block and cached with it
(``Block.derived``), so a client that repeats its headers costs a dict lookup: the
``:authority`` routed on, the deadline (``grpc-timeout``), the metadata a routing rule
reads (:class:`Metadata`), whether the call is a health check, why the request is
malformed if it is, and the block re-encoded for the replica without its
``x-forwarded-for`` (the call adds the client's address).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TypeVar, overload

from merlin_dp.gateway.grpc import health
from merlin_dp.gateway.h2.codec import Block, encode

_T = TypeVar("_T")

_TIMEOUT_UNITS = MappingProxyType(
    {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
)

# RFC 9113 §8.2.2: connection-specific fields make a request malformed.
CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout``: at most 8 digits and a unit; None if malformed."""
    try:
        unit = _TIMEOUT_UNITS[value[-1:]]
    except KeyError:
        return None
    digits = value[:-1]
    if not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds`` (at least 1 µs)."""
    micros = max(1, int(seconds * 1e6))
    if micros < 100_000_000:
        return b"%du" % micros
    return b"%dm" % min(99_999_999, micros // 1000)


class Metadata(Mapping[str, str]):
    """Request headers as the rule reads them: names case-insensitive (h2 names are
    lowercase, rules may say ``X-Variant``); repeated cookies joined as HTTP/1 has them."""

    __slots__ = ("_fields",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        fields: dict[str, str] = {}
        for name, value in headers:
            if name[:1] == b":":
                continue
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            have = fields.get(key)
            if have is None:
                fields[key] = text
            else:
                fields[key] = have + ("; " if key == "cookie" else ", ") + text
        self._fields = fields

    def __getitem__(self, key: str) -> str:
        return self._fields[key.lower()]

    # Mapping.get would go through __getitem__ and a KeyError for every absent header
    # a rule asks about: the common case on the hot path.
    @overload
    def get(self, key: str, /) -> str | None: ...

    @overload
    def get(self, key: str, default: str | _T, /) -> str | _T: ...

    def get(self, key: str, default: object = None, /) -> object:
        return self._fields.get(key.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class RequestHead:
    """What a request header block says, derived once per distinct block (cached with
    it in the connection's decoder)."""

    __slots__ = ("authority", "error", "forward", "forwarded_for", "has_request_id",
                 "health", "metadata", "timeout")  # fmt: skip

    def __init__(self, block: Block) -> None:
        authority = path = method = None
        timeout = None
        self.has_request_id = False
        self.forwarded_for: bytes | None = None
        self.error: str | None = None
        forward = []
        for name, value in block.headers:
            if name == b"x-forwarded-for":
                # Extended with the client's address, as on HTTP.
                prior: bytes | None = self.forwarded_for
                self.forwarded_for = value if prior is None else prior + b", " + value
                continue
            forward.append((name, value))
            if name in CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
                self.error = f"connection-specific field {name.decode('latin-1')!r}"
            elif name != name.lower():
                self.error = "uppercase field name"
            elif name == b":authority" or (name == b"host" and authority is None):
                authority = value
            elif name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"grpc-timeout":
                timeout = parse_timeout(value)
                if timeout is None:
                    self.error = "malformed grpc-timeout"
            elif name == b"x-request-id":
                self.has_request_id = True
        if not path or method is None:
            self.error = "a request needs :method and :path"
        host = (authority or b"").decode("latin-1")
        colon = host.rfind(":")
        if colon >= 0 and not host.endswith("]"):
            host = host[:colon]
        self.authority = host.lower()
        self.timeout = timeout
        # A grpc.health.v1.Health method: the gateway answers it (merlin_dp.gateway.grpc.health).
        self.health = path if path and path.startswith(health.PREFIX) else None
        self.metadata = Metadata(block.headers)
        self.forward = block.encoded() if self.forwarded_for is None else encode(forward)
