"""Where route tables come from. Each source validates before it hands a table over.

A source calls ``apply(spec)`` with every new valid table and ``reject(reason)`` with
every one it could not accept; the gateway keeps serving the last good table across
rejections. :class:`FileRouteSource` follows a route file (re-read when it changes, or
at once on SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.routes import RouteFileError, RouteTableSpec, load_route_file

log = logging.getLogger("gateway.routes")

Apply = Callable[[RouteTableSpec], None]
Reject = Callable[[str], None]


class RouteSource(Protocol):
    description: str

    async def run(self, apply: Apply, reject: Reject) -> None: ...

    def poke(self) -> None:
        """Look for a new table now rather than at the next interval."""


class FileRouteSource:
    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.description = f"file {path}"
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def run(self, apply: Apply, reject: Reject) -> None:
        seen: tuple[int, int, int] | None = None
        first = True
        while True:
            signature = self._signature()
            if first or signature != seen or self._wake.is_set():
                self._wake.clear()
                first = False
                seen = signature
                try:
                    spec = load_route_file(self.path)
                except RouteFileError as exc:
                    log.error("route file rejected, still serving the last good table: %s", exc)
                    reject(str(exc))
                else:
                    apply(spec)
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
