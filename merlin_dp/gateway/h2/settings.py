"""The SETTINGS exchange (RFC 9113 §6.5): what we announce, and what the peer told us.

Ours come from :class:`merlin_dp.gateway.h2.limits.H2Limits` and go out once, first
thing (:func:`announced`). The peer's are kept in :class:`PeerSettings` as we act on
them; :func:`check_frame` validates a SETTINGS frame and :func:`apply` works out what it
changes: stream send windows move with ``SETTINGS_INITIAL_WINDOW_SIZE``, DATA is split
to ``SETTINGS_MAX_FRAME_SIZE``, the pool opens another connection at
``SETTINGS_MAX_CONCURRENT_STREAMS``, and a new ``SETTINGS_HEADER_TABLE_SIZE`` is
acknowledged at the start of our next header block. A frame that breaks the rules
raises :class:`SettingsError`, a connection error.
"""

from __future__ import annotations

from collections.abc import Iterable

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.flow import Windowed, shift_send_windows
from merlin_dp.gateway.h2.limits import H2Limits

# SETTINGS_MAX_FRAME_SIZE's ceiling (RFC 9113 §6.5.2).
MAX_FRAME_CEILING = 16_777_215


class SettingsError(Exception):
    """A SETTINGS frame the peer must not send: the connection ends with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerSettings:
    """The peer's settings as we act on them (the protocol's defaults until it says)."""

    __slots__ = ("initial_window", "max_frame", "max_streams", "received", "table_size_update")

    def __init__(self) -> None:
        self.initial_window = f.DEFAULT_WINDOW  # a new stream's send window
        self.max_frame = f.DEFAULT_MAX_FRAME  # the largest frame we may send
        self.max_streams = 2**31  # streams we may have open at once
        # The peer changed SETTINGS_HEADER_TABLE_SIZE: our next header block must start
        # with a dynamic table size update (RFC 7541 §4.2). We never index, so 0 fits.
        self.table_size_update = False
        self.received = False  # its first SETTINGS has arrived


def announced(limits: H2Limits, client_side: bool) -> dict[int, int]:
    """Our SETTINGS, sent once when the connection opens."""
    values = {
        f.SETTINGS_MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        f.SETTINGS_INITIAL_WINDOW_SIZE: limits.stream_window,
        f.SETTINGS_MAX_FRAME_SIZE: limits.max_frame_size,
        f.SETTINGS_MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
    }
    if client_side:
        values[f.SETTINGS_ENABLE_PUSH] = 0
    return values


def check_frame(flags: int, sid: int, payload: bytes) -> None:
    """Raise :class:`SettingsError` if a SETTINGS frame is malformed."""
    if sid != 0:
        raise SettingsError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & f.ACK:
        if payload:
            raise SettingsError(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
    elif len(payload) % 6:
        raise SettingsError(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")


def apply(peer: PeerSettings, payload: bytes, streams: Iterable[Windowed]) -> bool:
    """Take the values of a (checked, non-ACK) SETTINGS frame in order; True if the
    streams' send windows grew, so DATA queued for want of window may go."""
    grow = False
    for key, value in f.parse_settings(payload):
        if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
            if value > f.MAX_WINDOW:
                raise SettingsError(f.FLOW_CONTROL_ERROR, "initial window too large")
            delta = value - peer.initial_window
            peer.initial_window = value
            if not shift_send_windows(streams, delta):
                # RFC 9113 §6.9.2: a connection error.
                raise SettingsError(f.FLOW_CONTROL_ERROR, "a stream window overflowed")
            grow = grow or delta > 0
        elif key == f.SETTINGS_MAX_FRAME_SIZE:
            if not f.DEFAULT_MAX_FRAME <= value <= MAX_FRAME_CEILING:
                raise SettingsError(f.PROTOCOL_ERROR, "bad max frame size")
            peer.max_frame = value
        elif key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
            peer.max_streams = value
        elif key == f.SETTINGS_HEADER_TABLE_SIZE:
            peer.table_size_update = True
        elif key == f.SETTINGS_ENABLE_PUSH and value > 1:
            raise SettingsError(f.PROTOCOL_ERROR, "bad enable push")
    peer.received = True
    return grow
