"""One HTTP/2 connection as an asyncio protocol: the frame loop and the send queue.

:class:`H2Connection` is what both ends of the proxy share. It parses frames inline in
``data_received`` (no reader task, no await) and acts on each by type; assembles header
blocks split over CONTINUATION frames and decodes them; answers SETTINGS and PING; and
queues what we write: frames go out with one ``writelines`` per loop turn, and DATA a
peer has no window for waits in its stream's ``pending`` until a WINDOW_UPDATE (or the
transport resumes). It ends streams (END_STREAM both ways, RST_STREAM) and the
connection (GOAWAY, then a lingering close).

Each other concern has its own module: the windows and the crediting of what we read
in :mod:`merlin_dp.gateway.h2.flow`, the SETTINGS exchange in
:mod:`merlin_dp.gateway.h2.settings`, streams and their handlers in
:mod:`merlin_dp.gateway.h2.streams`, our budgets in :mod:`merlin_dp.gateway.h2.limits`.
The client-facing connection (:mod:`merlin_dp.gateway.h2.server`) and the replica-facing
one (:mod:`merlin_dp.gateway.pool.h2`) differ only in how a header block opens or
continues a stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2 import settings
from merlin_dp.gateway.h2.codec import Block, HeaderBlockError, HeaderDecoder, encode_field
from merlin_dp.gateway.h2.flow import Flow, opening_update
from merlin_dp.gateway.h2.limits import H2Limits, TokenBucket
from merlin_dp.gateway.h2.settings import PeerSettings, SettingsError
from merlin_dp.gateway.h2.streams import CONNECTION_LOST, Stream

log = logging.getLogger("merlin_dp.gateway.h2")

LINGER_SECONDS = 2.0
# Bytes queued for the peer in one turn after which the client-facing side stops reading.
OUT_LIMIT = 256 * 1024
# What a stream's pending frame is.
_DATA = 0
_HEADERS = 1


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection, at either end. A subclass says what a header block means
    (``on_header_block``: a new stream, or one continued) and what the peer's GOAWAY
    does (``on_goaway``), and fills in the hooks it needs."""

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
        self.flow = Flow(limits, self.credit_on_receipt, self.send)
        self.peer_settings = PeerSettings()
        self.paused = False
        self.closed = False
        self.goaway_sent = False
        self.goaway_received = False
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
        self._control = TokenBucket(limits.control_burst, limits.control_per_second, loop.time())

    # --- transport ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports aren't asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.initial_frames())

    def initial_frames(self) -> bytes:
        """Our SETTINGS and our connection window: the first thing we send."""
        limits = self.limits
        announced = settings.announced(limits, self.client_side)
        return f.settings_frame(announced) + opening_update(limits)

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
        flow = self.flow
        flow.recv_window -= size
        if flow.recv_window < 0:
            self.fail(f.FLOW_CONTROL_ERROR, "connection window exceeded")
            return
        if flow.on_receipt:
            flow.received(size)
        data = payload
        if flags & f.PADDED:
            if size == 0 or payload[0] >= size:
                self.fail(f.PROTOCOL_ERROR, "bad padding")
                return
            data = payload[1 : size - payload[0]]
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            # Closed (we reset it, or it ended): drop the bytes, keep the window whole.
            flow.credit(None, size)
            if stream is None and sid > self.last_peer_stream and not self.client_side:
                self.fail(f.PROTOCOL_ERROR, "DATA on an idle stream")
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            flow.credit(None, size)
            self._stream_error(stream, f.FLOW_CONTROL_ERROR)
            return
        if len(data) != size:
            flow.credit(stream, size - len(data))  # the padding
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
        self.flow.settle(stream)
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
        try:
            settings.check_frame(flags, sid, payload)
            if flags & f.ACK or not self._control_frame():
                return
            grow = settings.apply(self.peer_settings, payload, self.streams.values())
        except SettingsError as exc:
            self.fail(exc.code, str(exc))
            return
        self.send(f.SETTINGS_ACK)
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
            flow = self.flow
            flow.send_window += increment
            if flow.send_window > f.MAX_WINDOW:
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
        peer = self.peer_settings
        if peer.table_size_update:
            peer.table_size_update = False
            block = b"\x20" + block  # dynamic table size update: 0
        n = len(block)
        if n <= peer.max_frame:
            flags = f.END_HEADERS | f.END_STREAM if end_stream else f.END_HEADERS
            self.send(f.frame_head(n, f.HEADERS, flags, stream.id) + block)
        else:
            self.send(f.headers_frames(stream.id, block, end_stream, peer.max_frame))
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
        flow = self.flow
        window = min(flow.send_window, stream.send_window)
        if window <= 0:
            return data
        max_frame = self.peer_settings.max_frame
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
        flow.send_window -= written
        stream.send_window -= written
        peer = stream.peer
        if peer is not None:
            # The bytes came from the peer stream: written on, they are credited back to
            # their sender (here, not in a method of flow's: this runs per DATA frame).
            stream.sent += written
            extra = stream.sent - peer.credited
            if extra > 0:
                peer.credited += extra
                peer.conn.flow.credit(peer, extra)
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
            if self.paused or self.flow.send_window <= 0 or self.closed:
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
        self.flow.settle(stream)
        self.stream_closed(stream)

    def _closed(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.blocked.pop(stream.id, None)
            self.flow.settle(stream)
            self.stream_closed(stream)

    def stream_closed(self, stream: Stream) -> None:
        """Hook: a stream left the connection (ended both ways, or reset)."""
