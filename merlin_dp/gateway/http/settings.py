"""The HTTP front's settings: limits on what a client may send, and its clocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FrontSettings:
    max_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 100
    header_timeout: float = 10.0
    keepalive: float = 75.0
    max_connections: int = 10_000
    # After an early answer (413), how long the rest of an upload is read and dropped so
    # that the client sees the answer rather than a reset.
    linger_seconds: float = 2.0

    @property
    def head_limit(self) -> int:
        """A whole request head, in bytes (nginx allows 4 x 8 KiB)."""
        return max(64 * 1024, self.max_line_bytes + 2 * self.max_header_bytes)
