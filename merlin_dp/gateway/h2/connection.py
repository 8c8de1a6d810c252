"""What both ends of the proxy share: one HTTP/2 connection as an asyncio protocol.

:class:`H2Connection` parses frames inline in ``data_received`` (no reader task, no
await), answers SETTINGS and PING, keeps both flow-control windows, and queues DATA a
peer has no window for. The client-facing connection (:mod:`merlin_dp.gateway.h2.server`) and
the replica-facing one (:mod:`merlin_dp.gateway.pool.h2`) differ only in how a header block
opens or continues a stream.

Back-pressure is end to end with no buffer of our own to bound: bytes received on one
side are credited back to their sender (WINDOW_UPDATE) only once written to the other
side's transport, and nothing is written while that transport is paused. A stream
therefore never holds more than the window we granted its source.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import Block, HeaderBlockError, HeaderDecoder, encode_field

log = logging.getLogger("merlin_dp.gateway.h2")

# on_reset's code when the connection itself is gone: the peer may or may not have
# seen the stream.
CONNECTION_LOST = -1

_DATA = 0
LINGER_SECONDS = 2.0
# Bytes queued for the peer in one turn after which the client-facing side stops reading.
OUT_LIMIT = 256 * 1024
_HEADERS = 1


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


class StreamHandler(Protocol):
    """Who a stream's frames go to (the proxied call, or a mirror copy)."""

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None: ...

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None: ...

    def on_reset(self, stream: Stream, code: int) -> None: ...


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

    def __init__(self, conn: H2Connection, stream_id: int, handler: StreamHandler) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler = handler
        self.peer: Stream | None = None
        self.send_window = conn.peer_initial_window
        self.recv_window = conn.limits.stream_window
        self.pending: deque[tuple[bytes, int, bool]] = deque()
        self.sent = 0  # DATA bytes written, for crediting the peer
        self.received = 0  # DATA bytes handed to the handler
        self.credited = 0  # bytes received and credited back to the sender
        self.unacked = 0  # credited but not yet announced in a WINDOW_UPDATE
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
        self.conn.credit(self, n)


class H2Connection(asyncio.Protocol):
    client_side = False
    # The connection-level window is given back as bytes arrive, not once they are
    # written on (per stream it stays end to end). The replica-facing side does: one
    # client that stops reading must not use up a connection other clients share.
    credit_on_receipt = False

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: H2Limits) -> None:
        self.loop = loop
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with queued frames, in order
        self.decoder = HeaderDecoder(limits.max_header_list_size)
        self.send_window = f.DEFAULT_WINDOW
        self.recv_window = limits.connection_window
        self.conn_unacked = 0
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.peer_max_streams = 2**31
        # The peer changed SETTINGS_HEADER_TABLE_SIZE: our next header block must start
        # with a dynamic table size update (RFC 7541 §4.2). We never index, so 0 fits.
        self.table_size_update = False
        self.paused = False
        self.closed = False
        self.goaway_sent = False
        self.goaway_received = False
        self.settings_received = False
        self.last_peer_stream = 0  # highest stream id the peer opened
        self.peer_host = b"unknown"
        self.forwarded_for = encode_field(b"x-forwarded-for", b"unknown")
        self.last_active = loop.time()
        self._buf = b""
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0  # queued in _out this turn
        self.reads_held = False  # reading stopped until what we owe the peer is written
        self._cont_stream = 0
        self._cont_flags = 0
        self._cont_parts: list[bytes] = []
        self._cont_count = 0
        self._cont_size = 0
        self._stream_threshold = limits.stream_window // 4
        self._conn_threshold = limits.connection_window // 4
        self._control = TokenBucket(limits.control_burst, limits.control_per_second, loop.time())

    # --- transport ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports aren't asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.initial_frames())

    def initial_frames(self) -> bytes:
        lim = self.limits
        settings = {
            f.SETTINGS_MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            f.SETTINGS_INITIAL_WINDOW_SIZE: lim.stream_window,
            f.SETTINGS_MAX_FRAME_SIZE: lim.max_frame_size,
            f.SETTINGS_MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        if self.client_side:
            settings[f.SETTINGS_ENABLE_PUSH] = 0
        out = f.settings_frame(settings)
        if lim.connection_window > f.DEFAULT_WINDOW:
            out += f.window_update(0, lim.connection_window - f.DEFAULT_WINDOW)
        return out

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush_all()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_streams()
        self.lost()

    def _drop_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for stream in streams:
            stream.handler.on_reset(stream, CONNECTION_LOST)

    def lost(self) -> None:
        """Hook: the connection is gone and its streams have been told."""

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()

    def send(self, data: bytes | memoryview) -> None:
        """Queue bytes for the peer; everything queued in one turn of the loop goes out
        in one write. A batch of calls read at once is answered with one syscall per
        connection instead of one per frame, which is most of a proxied call's cost."""
        if self.closed:
            return
        out = self._out
        out.append(data)
        self._out_bytes += len(data)
        if len(out) == 1:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self._out_bytes = 0
            transport = self.transport
            if transport is not None and not self.closed:
                transport.writelines(out)
        if self.reads_held and not self.paused:
            self.release_reads()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with the reason, then close (RFC 9113 §5.4.1)."""
        if self.closed or self.transport is None:
            return
        log.debug("h2 connection error %d: %s", code, message)
        self._flush()
        transport = self.transport
        transport.write(f.goaway(self.last_peer_stream, code, message.encode()[:256]))
        self.goaway_sent = True
        self.closed = True
        self._drop_streams()
        # Closing with the peer's bytes unread would make the kernel answer RST, which
        # can destroy the GOAWAY before it is read: half-close, read and drop what
        # still comes for a moment (a lingering close, as nginx does), then close.
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    # --- reading ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after a connection error
        if self._buf:
            data = self._buf + data
            self._buf = b""
        self.last_active = self.loop.time()
        pos = 0
        n = len(data)
        limit = self.limits.max_frame_size
        while n - pos >= 9:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            if length > limit:
                self.fail(f.FRAME_SIZE_ERROR, f"frame of {length} bytes over {limit}")
                return
            end = pos + 9 + length
            if end > n:
                break
            ftype = data[pos + 3]
            flags = data[pos + 4]
            sid = (
                ((data[pos + 5] & 0x7F) << 24)
                | (data[pos + 6] << 16)
                | (data[pos + 7] << 8)
                | data[pos + 8]
            )
            payload = data[pos + 9 : end]
            pos = end
            if self._cont_stream and ftype != f.CONTINUATION:
                self.fail(f.PROTOCOL_ERROR, "expected CONTINUATION")
                return
            if ftype == f.DATA:
                self._on_data(flags, sid, payload)
            elif ftype == f.HEADERS:
                self._on_headers(flags, sid, payload)
            elif ftype == f.WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif ftype == f.RST_STREAM:
                self._on_rst(sid, payload)
            elif ftype == f.SETTINGS:
                self._on_settings(flags, sid, payload)
            elif ftype == f.PING:
                self._on_ping(flags, sid, payload)
            elif ftype == f.GOAWAY:
                if sid != 0 or length < 8:
                    self.fail(f.PROTOCOL_ERROR, "malformed GOAWAY")
                    return
                self.goaway_received = True
                last, code = f.parse_goaway(payload)
                self.on_goaway(last, code)
            elif ftype == f.CONTINUATION:
                self._on_continuation(flags, sid, payload)
            elif ftype == f.PRIORITY:
                if sid == 0 or length != 5:
                    self.fail(f.PROTOCOL_ERROR, "malformed PRIORITY")
            elif ftype == f.PUSH_PROMISE:
                self.fail(f.PROTOCOL_ERROR, "PUSH_PROMISE not allowed")
            # Unknown frame types are ignored (RFC 9113 §4.1).
            if self.closed:
                return
            if self._out_bytes > OUT_LIMIT and self.hold_reads():
                # Answers pile up faster than they are written (a client that sends
                # small requests and doesn't read): the rest waits until they are out.
                self._buf = data[pos:]
                return
        if pos < n:
            self._buf = data[pos:]

    def hold_reads(self) -> bool:
        """Hook: stop reading from the peer for now (True if done); the client-facing
        side does, so one connection can't make us queue without bound."""
        return False

    def release_reads(self) -> None:
        """Hook: read again, starting with what was held back."""

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            self.fail(f.PROTOCOL_ERROR, "DATA on stream 0")
            return
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            self.fail(f.FLOW_CONTROL_ERROR, "connection window exceeded")
            return
        if self.credit_on_receipt:
            self._credit_connection(size)
        data = payload
        if flags & f.PADDED:
            if size == 0 or payload[0] >= size:
                self.fail(f.PROTOCOL_ERROR, "bad padding")
                return
            data = payload[1 : size - payload[0]]
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            # Closed (we reset it, or it ended): drop the bytes, keep the window whole.
            self.credit(None, size)
            if stream is None and sid > self.last_peer_stream and not self.client_side:
                self.fail(f.PROTOCOL_ERROR, "DATA on an idle stream")
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self.credit(None, size)
            self._stream_error(stream, f.FLOW_CONTROL_ERROR)
            return
        if len(data) != size:
            self.credit(stream, size - len(data))
        end = bool(flags & f.END_STREAM)
        if end:
            stream.remote_closed = True
        stream.received += len(data)
        stream.handler.on_data(stream, data, end)
        if end and stream.local_closed:
            self._closed(stream)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            self.fail(f.PROTOCOL_ERROR, "HEADERS on stream 0")
            return
        start = 0
        end = len(payload)
        if flags & f.PADDED:
            if not payload or payload[0] >= end:
                self.fail(f.PROTOCOL_ERROR, "bad padding")
                return
            end -= payload[0]
            start = 1
        if flags & f.PRIORITY_FLAG:
            start += 5
            if start > end:
                self.fail(f.PROTOCOL_ERROR, "bad priority")
                return
        fragment = payload[start:end] if start or end != len(payload) else payload
        if flags & f.END_HEADERS:
            self._header_block(sid, flags, fragment)
            return
        self._cont_stream = sid
        self._cont_flags = flags
        self._cont_parts = [fragment]
        self._cont_count = 0
        self._cont_size = len(fragment)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != self._cont_stream or sid == 0:
            self.fail(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
            return
        self._cont_count += 1
        self._cont_size += len(payload)
        if (
            self._cont_count > self.limits.max_continuations
            or self._cont_size > 2 * self.limits.max_header_list_size
        ):
            # A CONTINUATION flood: never buffer a header block without bound.
            self.fail(f.ENHANCE_YOUR_CALM, "header block too long")
            return
        self._cont_parts.append(payload)
        if flags & f.END_HEADERS:
            self._cont_stream = 0
            block = b"".join(self._cont_parts)
            self._cont_parts = []
            self._header_block(sid, self._cont_flags, block)

    def _header_block(self, sid: int, flags: int, data: bytes) -> None:
        try:
            block = self.decoder.decode(data)
        except HeaderBlockError as exc:
            # The decoder may be half-way through the block: its table is out of step
            # with the peer's, so the connection can't continue.
            code = f.ENHANCE_YOUR_CALM if exc.oversized else f.COMPRESSION_ERROR
            self.fail(code, str(exc))
            return
        self.on_header_block(sid, block, bool(flags & f.END_STREAM))

    def on_header_block(self, sid: int, block: Block, end_stream: bool) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        raise NotImplementedError

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if sid == 0 or len(payload) != 4:
            self.fail(f.PROTOCOL_ERROR if sid == 0 else f.FRAME_SIZE_ERROR, "malformed RST_STREAM")
            return
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        self.blocked.pop(sid, None)
        stream.pending.clear()
        stream.local_closed = stream.remote_closed = True
        self.peer_reset(stream)
        stream.handler.on_reset(stream, f.u32(payload))
        self._settle(stream)
        self.stream_closed(stream)

    def peer_reset(self, stream: Stream) -> None:
        """Hook: the peer reset an open stream, or made us reset it (the server counts
        these)."""

    def _control_frame(self) -> bool:
        """Take a token for a frame we must answer; False (and GOAWAY) when out."""
        if not self._control.take(self.loop.time()):
            self.fail(f.ENHANCE_YOUR_CALM, "too many control frames")
            return False
        return True

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            self.fail(f.PROTOCOL_ERROR, "SETTINGS on a stream")
            return
        if flags & f.ACK:
            if payload:
                self.fail(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            self.fail(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
            return
        if not self._control_frame():
            return
        grow = False
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    self.fail(f.FLOW_CONTROL_ERROR, "initial window too large")
                    return
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        # RFC 9113 §6.9.2: a connection error.
                        self.fail(f.FLOW_CONTROL_ERROR, "a stream window overflowed")
                        return
                grow = grow or delta > 0
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= 16_777_215:
                    self.fail(f.PROTOCOL_ERROR, "bad max frame size")
                    return
                self.peer_max_frame = value
            elif key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == f.SETTINGS_HEADER_TABLE_SIZE:
                self.table_size_update = True
            elif key == f.SETTINGS_ENABLE_PUSH and value > 1:
                self.fail(f.PROTOCOL_ERROR, "bad enable push")
                return
        self.send(f.SETTINGS_ACK)
        self.settings_received = True
        if grow:
            self.flush_all()

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0 or len(payload) != 8:
            self.fail(f.PROTOCOL_ERROR if sid else f.FRAME_SIZE_ERROR, "malformed PING")
            return
        if flags & f.ACK or not self._control_frame():
            return
        self.send(f.frame(f.PING, f.ACK, 0, payload))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self.fail(f.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
            return
        increment = f.u32(payload) & f.MAX_WINDOW
        if sid == 0:
            if increment == 0:
                self.fail(f.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
                return
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                self.fail(f.FLOW_CONTROL_ERROR, "connection window overflow")
                return
            self.flush_all()
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
        if increment == 0:
            self._stream_error(stream, f.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self._stream_error(stream, f.FLOW_CONTROL_ERROR)
            return
        if stream.pending:
            self.flush(stream)

    def _stream_error(self, stream: Stream, code: int) -> None:
        # A reset the peer provoked costs it as much as one it sent (CVE-2025-8671,
        # "MadeYouReset"): the call behind the stream was already under way.
        self.peer_reset(stream)
        self.reset_stream(stream, code)
        stream.handler.on_reset(stream, code)

    # --- flow control toward the peer -----------------------------------------------

    def credit(self, stream: Stream | None, n: int) -> None:
        """``n`` received bytes are off our hands: let the peer send as many more."""
        if self.closed or n <= 0:
            return
        out = b""
        if not self.credit_on_receipt:
            self.conn_unacked += n
            if self.conn_unacked >= self._conn_threshold:
                out = f.window_update(0, self.conn_unacked)
                self.recv_window += self.conn_unacked
                self.conn_unacked = 0
        if stream is not None and not stream.remote_closed:
            stream.unacked += n
            if stream.unacked >= self._stream_threshold:
                out += f.window_update(stream.id, stream.unacked)
                stream.recv_window += stream.unacked
                stream.unacked = 0
        if out:
            self.send(out)

    def _credit_connection(self, n: int) -> None:
        self.conn_unacked += n
        if self.conn_unacked >= self._conn_threshold and not self.closed:
            self.send(f.window_update(0, self.conn_unacked))
            self.recv_window += self.conn_unacked
            self.conn_unacked = 0

    def queued_bytes(self) -> int:
        """DATA bytes waiting in this connection's streams for window or transport."""
        return sum(
            len(item[0]) for s in self.blocked.values() for item in s.pending if item[1] == _DATA
        )

    # --- writing ------------------------------------------------------------------

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        if stream.pending:
            stream.pending.append((block, _HEADERS, end_stream))
            return
        self._write_headers(stream, block, end_stream)

    def _write_headers(self, stream: Stream, block: bytes, end_stream: bool) -> None:
        if self.closed or self.transport is None:
            return
        if self.table_size_update:
            self.table_size_update = False
            block = b"\x20" + block  # dynamic table size update: 0
        n = len(block)
        if n <= self.peer_max_frame:
            flags = f.END_HEADERS | f.END_STREAM if end_stream else f.END_HEADERS
            self.send(f.frame_head(n, f.HEADERS, flags, stream.id) + block)
        else:
            self.send(f.headers_frames(stream.id, block, end_stream, self.peer_max_frame))
        if end_stream:
            stream.local_closed = True
            if stream.remote_closed:
                self._closed(stream)

    def send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        if stream.pending or self.paused:
            stream.pending.append((data, _DATA, end_stream))
            self.blocked[stream.id] = stream
            return
        rest = self._emit(stream, data, end_stream)
        if rest is not None:
            stream.pending.append((rest, _DATA, end_stream))
            self.blocked[stream.id] = stream

    def _emit(self, stream: Stream, data: bytes, end: bool) -> bytes | None:
        """Write what the windows allow; the rest is returned to queue."""
        transport = self.transport
        if self.closed or transport is None:
            return None
        n = len(data)
        sid = stream.id
        if n == 0:
            if end:
                self.send(f.frame_head(0, f.DATA, f.END_STREAM, sid))
                self._local_end(stream)
            return None
        window = min(self.send_window, stream.send_window)
        if window <= 0:
            return data
        max_frame = self.peer_max_frame
        if n <= window and n <= max_frame:
            head = f.frame_head(n, f.DATA, f.END_STREAM if end else 0, sid)
            if n <= 4096:
                self.send(head + data)  # one small copy beats a second queued buffer
            else:
                self.send(head)
                self.send(data)
            written = n
        else:
            view = memoryview(data)
            parts = self._out
            if not parts:
                self.loop.call_soon(self._flush)
            written = 0
            while written < n and window > 0:
                size = min(n - written, window, max_frame)
                last = end and written + size == n
                parts.append(f.frame_head(size, f.DATA, f.END_STREAM if last else 0, sid))
                parts.append(view[written : written + size])
                written += size
                window -= size
        self.send_window -= written
        stream.send_window -= written
        peer = stream.peer
        if peer is not None:
            stream.sent += written
            extra = stream.sent - peer.credited
            if extra > 0:
                peer.credited += extra
                peer.conn.credit(peer, extra)
        if written < n:
            return data[written:]
        if end:
            self._local_end(stream)
        return None

    def _local_end(self, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._closed(stream)

    def flush(self, stream: Stream) -> None:
        pending = stream.pending
        while pending:
            payload, kind, end = pending[0]
            if kind == _HEADERS:
                pending.popleft()
                self._write_headers(stream, payload, end)
                continue
            if self.paused:
                break
            rest = self._emit(stream, payload, end)
            if rest is not None:
                pending[0] = (rest, _DATA, end)
                break
            pending.popleft()
        if not pending:
            self.blocked.pop(stream.id, None)

    def flush_all(self) -> None:
        if not self.blocked:
            return
        for stream in list(self.blocked.values()):
            if self.paused or self.send_window <= 0 or self.closed:
                return
            self.flush(stream)

    def reset_stream(self, stream: Stream, code: int) -> None:
        """Reset a stream from our side; its handler is not told (the caller knows)."""
        if self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        self.blocked.pop(stream.id, None)
        stream.pending.clear()
        stream.local_closed = stream.remote_closed = True
        self.send(f.rst_stream(stream.id, code))
        self._settle(stream)
        self.stream_closed(stream)

    def _closed(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.blocked.pop(stream.id, None)
            self._settle(stream)
            self.stream_closed(stream)

    def _settle(self, stream: Stream) -> None:
        """A stream left the connection: bytes it received that were never credited
        (held for a call that failed, queued toward a peer that went away) go back to the
        connection's window, or the window would shrink for good."""
        owed = stream.received - stream.credited
        if owed > 0:
            stream.credited += owed
            self.credit(None, owed)

    def stream_closed(self, stream: Stream) -> None:
        """Hook: a stream left the connection (ended both ways, or reset)."""


Factory = Callable[[], H2Connection]
