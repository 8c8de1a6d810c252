"""Small asyncio helpers shared by long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library turned into another error.

    Client libraries (redis-py, aiohttp timeouts on Python 3.11) can surface a
    cancellation as a timeout or connection error. A reconnect loop that catches those
    must not swallow it, or the task never stops; call this in the handler.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def close_quietly(close: Awaitable[object], seconds: float = 1.0) -> None:
    """Await a client's close, bounded: a close that blocks on a dead peer (or absorbs
    a cancellation) must not keep a stopping task alive."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            await close


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], seconds: float = 2.0) -> None:
    """Cancel tasks and give them a bounded moment to finish."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=seconds)
