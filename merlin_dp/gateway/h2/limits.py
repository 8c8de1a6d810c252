"""What we grant an HTTP/2 peer, and how much we let it make us do.

:class:`H2Limits` is one connection's budget: the windows and sizes we announce in our
SETTINGS, and the abuse limits a public port needs (each answered with GOAWAY).
:class:`TokenBucket` is how the rate limits among them (rapid reset, SETTINGS and PING
floods) are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from merlin_dp.gateway.h2 import frames as f


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What we grant a peer, and what we allow it before cutting the connection."""

    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = f.DEFAULT_MAX_FRAME  # frames we accept
    max_header_list_size: int = 16 * 1024
    # Concurrent streams, as nginx's http2_max_concurrent_streams: with the stream window
    # it bounds what one client connection can have us hold (128 x 1 MiB).
    max_concurrent_streams: int = 128
    # Response bytes queued for one client connection after which new streams are
    # refused (REFUSED_STREAM) until it reads.
    queued_budget: int = 8 * 1024 * 1024
    max_continuations: int = 16  # CONTINUATION frames per header block
    # Rapid reset (CVE-2023-44487): streams a client may cancel, as a token bucket.
    reset_burst: int = 200
    resets_per_second: float = 100.0
    # SETTINGS and PING frames answered, as a token bucket (each costs us a write).
    control_burst: int = 200
    control_per_second: float = 50.0
    idle_seconds: float = 300.0  # a connection with no stream for this long is closed
    handshake_seconds: float = 10.0  # preface and first SETTINGS must arrive this soon


class TokenBucket:
    """``burst`` tokens, refilled at ``per_second``: what a peer may make us do."""

    __slots__ = ("at", "burst", "per_second", "tokens")

    def __init__(self, burst: int, per_second: float, now: float) -> None:
        self.burst = float(burst)
        self.per_second = per_second
        self.tokens = self.burst
        self.at = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True
