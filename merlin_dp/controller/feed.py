"""The route-table feed: the current table and a wake-up for every new revision.

Watchers (gateways on ``GET /v1/routes?watch=1``) wait on :meth:`RouteFeed.wait_newer`;
publishing replaces one immutable value and wakes them all. A watcher that falls behind
skips straight to the newest table: tables are whole, so no revision needs replaying.
"""

from __future__ import annotations

import asyncio

from merlin_dp.common.aio import raise_if_cancelling
from merlin_dp.spec.routes import RouteTableSpec


class RouteFeed:
    def __init__(self) -> None:
        self._table: RouteTableSpec | None = None
        self._json = b""
        self._changed = asyncio.Condition()
        self.closed = False

    @property
    def revision(self) -> int:
        return self._table.revision if self._table is not None else -1

    def current(self) -> tuple[RouteTableSpec | None, bytes]:
        return self._table, self._json

    async def publish(self, table: RouteTableSpec) -> None:
        async with self._changed:
            self._table = table
            self._json = table.model_dump_json().encode()
            self._changed.notify_all()

    async def wait_newer(self, since: int, wait_seconds: float) -> tuple[int, bytes] | None:
        """The newest table (revision, JSON) once its revision is above ``since``; None
        on timeout or when the feed closes (check ``closed``)."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.closed or self.revision > since),
                    wait_seconds,
                )
            except TimeoutError:
                raise_if_cancelling()
                return None
            return None if self.closed else (self.revision, self._json)

    async def close(self) -> None:
        """End every watch: the controller is stopping."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()
