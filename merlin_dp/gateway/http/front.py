"""The HTTP/1.1 traffic listener: its connections, their clocks, and a graceful stop.

:class:`HttpFront` accepts connections (:class:`~merlin_dp.gateway.http.connection.
HttpConnection` each) and hands every request to its handler, the proxy. It keeps what
is shared by a worker's connections:

- the cap on open connections (past it a new one gets 503 and is closed at once, so idle
  sockets can't exhaust memory or descriptors);
- one ticker for every clock: heads left unfinished past ``header_timeout`` (408, then
  close) and connections idle past ``keepalive`` (closed). A timer per request would
  cost more than the rest of a request's bookkeeping;
- the stop: no new connections, idle ones closed, the others closed after the answer
  under way, and whatever is left after the grace cut.
"""

from __future__ import annotations

import asyncio
import socket

from merlin_dp.gateway.http.connection import Handler, HttpConnection
from merlin_dp.gateway.http.responses import bad_version, head_too_large, line_too_long
from merlin_dp.gateway.http.settings import FrontSettings
from merlin_dp.gateway.metrics import ConnectionStats


class HttpFront:
    """A worker's HTTP/1.1 listener and the state its connections share."""

    def __init__(self, handler: Handler, settings: FrontSettings, stats: ConnectionStats) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.settings = settings
        self.stats = stats
        self.connections: set[HttpConnection] = set()
        self.heads: set[HttpConnection] = set()  # with a head left unfinished by a read
        self.closing = False
        # Ready-made answers for requests the connection refuses.
        self.line_too_long = line_too_long(settings.max_line_bytes)
        self.head_too_large = head_too_large(
            settings.head_limit, settings.max_headers, settings.max_header_bytes
        )
        self._versions: dict[str, bytes] = {}
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_seconds = min(1.0, settings.header_timeout / 4, settings.keepalive / 4)
        self._ticks_per_second = max(1, round(1 / self._tick_seconds))
        self._ticks = 0
        self._emptied: asyncio.Future[None] | None = None

    def bad_version(self, version: str) -> bytes:
        answer = self._versions.get(version)
        if answer is None:
            answer = bad_version(version)
            if len(self._versions) < 16:
                self._versions[version] = answer
        return answer

    async def start(self, sock: socket.socket) -> None:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), sock=sock, backlog=1024
        )
        self._ticker = self.loop.call_later(self._tick_seconds, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        if self.heads:
            late = now - self.settings.header_timeout
            for conn in [c for c in self.heads if c.head_since <= late]:
                self.heads.discard(conn)
                conn.head_since = 0.0
                conn.head_late()
        self._ticks += 1
        if self._ticks % self._ticks_per_second == 0:
            idle = now - self.settings.keepalive
            for conn in [c for c in self.connections if 0 < c.idle_since <= idle]:
                conn.shut_down()
        self._ticker = self.loop.call_later(self._tick_seconds, self._tick)

    def connection_closed(self) -> None:
        emptied = self._emptied
        if emptied is not None and not self.connections and not emptied.done():
            emptied.set_result(None)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let the answers under way finish within ``grace``; cut the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut_down()
        if self.connections:
            self._emptied = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), grace)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.abort()
                await asyncio.sleep(0)
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            await self._server.wait_closed()
