"""HTTP/2 streams: one :class:`Stream` per request/response exchange on a connection.

A stream belongs to its connection's table (``streams``, keyed by id, on
:class:`merlin_dp.gateway.h2.connection.H2Connection`) from its HEADERS until it has
ended both ways or been reset; frames for it go to its :class:`StreamHandler` (the
proxied call, a mirror copy, a health check). Proxying pairs two streams on two
connections (``peer``): writing one's bytes credits the other's window.

:class:`StreamOwner` is what a stream and its handler may ask of the connection; it is a
Protocol so this module needn't import the connection that imports it. The limits on the
table (concurrent streams, the queued-bytes budget) are checked where streams open
(:mod:`merlin_dp.gateway.h2.server`); :class:`RecentResets` is the table's memory of the
ids it reset, so their late frames are told from a misbehaving peer.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from merlin_dp.gateway.h2.codec import Block
from merlin_dp.gateway.h2.flow import Flow
from merlin_dp.gateway.h2.limits import H2Limits
from merlin_dp.gateway.h2.settings import PeerSettings

# on_reset's code when the connection itself is gone: the peer may or may not have
# seen the stream.
CONNECTION_LOST = -1

# Stream ids we reset, remembered so their late frames are told from a misbehaving peer.
RESET_IDS_KEPT = 1024


class StreamHandler(Protocol):
    """Who a stream's frames go to (the proxied call, or a mirror copy)."""

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None: ...

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None: ...

    def on_reset(self, stream: Stream, code: int) -> None: ...


class StreamOwner(Protocol):
    """The connection a stream lives on, as the stream and its handler see it."""

    streams: dict[int, Stream]  # the open streams, by id
    limits: H2Limits
    flow: Flow
    peer_settings: PeerSettings
    goaway_received: bool
    peer_host: bytes  # the peer's address, for x-forwarded-for
    forwarded_for: bytes  # ``x-forwarded-for: <peer_host>``, encoded once

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None: ...

    def send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None: ...

    def reset_stream(self, stream: Stream, code: int) -> None: ...

    def peer_reset(self, stream: Stream) -> None: ...


class Stream:
    """One stream on one connection. ``peer`` is the stream whose bytes this one sends:
    writing them credits the peer's window on its own connection."""

    __slots__ = (
        "conn",
        "credited",
        "handler",
        "id",
        "local_closed",
        "peer",
        "pending",
        "received",
        "recv_window",
        "remote_closed",
        "send_window",
        "sent",
        "unacked",
    )  # fmt: skip

    def __init__(self, conn: StreamOwner, stream_id: int, handler: StreamHandler) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler = handler
        self.peer: Stream | None = None
        # Flow control (merlin_dp.gateway.h2.flow).
        self.send_window = conn.peer_settings.initial_window
        self.recv_window = conn.limits.stream_window
        self.sent = 0  # DATA bytes written, for crediting the peer
        self.received = 0  # DATA bytes handed to the handler
        self.credited = 0  # bytes received and credited back to the sender
        self.unacked = 0  # credited but not yet announced in a WINDOW_UPDATE
        # Frames waiting for window or for the transport: (payload, kind, end_stream).
        self.pending: deque[tuple[bytes, int, bool]] = deque()
        self.local_closed = False
        self.remote_closed = False

    @property
    def open(self) -> bool:
        return self.conn.streams.get(self.id) is self

    def send_headers(self, block: bytes, end_stream: bool) -> None:
        self.conn.send_headers(self, block, end_stream)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        self.conn.send_data(self, data, end_stream)

    def reset(self, code: int) -> None:
        self.conn.reset_stream(self, code)

    def consumed(self, n: int) -> None:
        """``n`` received bytes are dropped or done with: credit them to the sender."""
        self.credited += n
        self.conn.flow.credit(self, n)


class RecentResets:
    """The last ``RESET_IDS_KEPT`` stream ids we reset or refused: HEADERS on one of them
    only keeps HPACK in step, where HEADERS on any other used id is a connection error
    (RFC 9113 §5.1.1)."""

    __slots__ = ("_ids", "_order")

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._order: deque[int] = deque()

    def __contains__(self, sid: int) -> bool:
        return sid in self._ids

    def add(self, sid: int) -> None:
        ids = self._ids
        if sid in ids:
            return
        ids.add(sid)
        self._order.append(sid)
        if len(self._order) > RESET_IDS_KEPT:
            ids.discard(self._order.popleft())
