"""HTTP/2 flow control (RFC 9113 §5.2, §6.9): the windows, and what we owe the peer.

A connection's :class:`Flow` holds its two connection-level windows (what we may send,
what the peer may still send us) and the credit not yet announced; each
:class:`merlin_dp.gateway.h2.streams.Stream` holds the same per stream (the fields of
:class:`Windowed`). The frame loop updates the windows inline as DATA and WINDOW_UPDATE
frames pass (a call per frame would cost more than the arithmetic); what is here is the
crediting: turning bytes we are done with into WINDOW_UPDATE frames.

Back-pressure is end to end with no buffer of our own to bound: bytes received on one
side are credited back to their sender only once written to the other side's transport
(or dropped), so a stream never holds more than the window we granted its source. The
replica-facing side credits its *connection* window as bytes arrive instead
(``on_receipt``): one client that stops reading must not use up a connection other
clients share; per stream the credit stays end to end. Credit is announced in batches,
once a quarter of the window is owed, not per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.limits import H2Limits


class Windowed(Protocol):
    """What flow control reads and writes on a stream."""

    id: int
    remote_closed: bool
    send_window: int  # DATA bytes we may still send on it
    recv_window: int  # DATA bytes the peer may still send on it
    received: int  # DATA bytes handed to the handler
    credited: int  # of those, credited back to the sender
    unacked: int  # credited but not yet announced in a WINDOW_UPDATE


class Flow:
    """One connection's windows both ways, and its credit not yet announced."""

    __slots__ = (
        "conn_threshold",
        "on_receipt",
        "recv_window",
        "send",
        "send_window",
        "stream_threshold",
        "unacked",
    )  # fmt: skip

    def __init__(self, limits: H2Limits, on_receipt: bool, send: Callable[[bytes], None]) -> None:
        self.send_window = f.DEFAULT_WINDOW  # until the peer's WINDOW_UPDATEs raise it
        self.recv_window = limits.connection_window
        self.unacked = 0  # connection credit not yet announced
        self.on_receipt = on_receipt
        self.conn_threshold = limits.connection_window // 4
        self.stream_threshold = limits.stream_window // 4
        self.send = send  # the connection's send queue, for our WINDOW_UPDATEs

    def credit(self, stream: Windowed | None, n: int) -> None:
        """``n`` received bytes are off our hands: let the peer send as many more (on
        ``stream`` too, unless it is None or the peer has ended it)."""
        if n <= 0:
            return
        out = b""
        if not self.on_receipt:
            self.unacked += n
            if self.unacked >= self.conn_threshold:
                out = f.window_update(0, self.unacked)
                self.recv_window += self.unacked
                self.unacked = 0
        if stream is not None and not stream.remote_closed:
            stream.unacked += n
            if stream.unacked >= self.stream_threshold:
                out += f.window_update(stream.id, stream.unacked)
                stream.recv_window += stream.unacked
                stream.unacked = 0
        if out:
            self.send(out)

    def received(self, n: int) -> None:
        """``n`` bytes arrived on a connection that credits on receipt (``on_receipt``)."""
        self.unacked += n
        if self.unacked >= self.conn_threshold:
            self.send(f.window_update(0, self.unacked))
            self.recv_window += self.unacked
            self.unacked = 0

    def settle(self, stream: Windowed) -> None:
        """``stream`` left the connection: bytes it received that were never credited
        (held for a call that failed, queued toward a peer that went away) go back to the
        connection's window, or the window would shrink for good."""
        owed = stream.received - stream.credited
        if owed > 0:
            stream.credited += owed
            self.credit(None, owed)


def opening_update(limits: H2Limits) -> bytes:
    """The WINDOW_UPDATE that raises the connection window from the protocol's default to
    ours (SETTINGS can only set the streams'), or nothing."""
    if limits.connection_window > f.DEFAULT_WINDOW:
        return f.window_update(0, limits.connection_window - f.DEFAULT_WINDOW)
    return b""


def shift_send_windows(streams: Iterable[Windowed], delta: int) -> bool:
    """The peer changed SETTINGS_INITIAL_WINDOW_SIZE: every open stream's send window
    moves by the difference (RFC 9113 §6.9.2). False if one overflows."""
    for stream in streams:
        stream.send_window += delta
        if stream.send_window > f.MAX_WINDOW:
            return False
    return True
