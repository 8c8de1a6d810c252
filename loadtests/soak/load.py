"""The normal clients: a closed-loop asyncio/aiohttp pool posting to the gateway's stable
URL, every request with its own ``X-Request-Id`` and its outcome kept by that id."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

from loadtests.soak.stack import HOST, PAYLOAD
from merlin_dp.common.net import LOOPBACK
from merlin_dp.loadtest.locust_common import failure_reason

CLIENTS = 8
CLIENT_TIMEOUT_S = 30.0


def exception_kind(exc: BaseException) -> str:
    """A failed exchange's cause, short: ``connection ServerDisconnectedError``,
    ``connection ClientConnectorError ECONNREFUSED``, ``client timeout``."""
    if isinstance(exc, TimeoutError):
        return "client timeout"
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    return f"connection {type(exc).__name__} {name}".rstrip()


@dataclass(frozen=True)
class Failure:
    """One normal request that failed."""

    cause: str  # "HTTP 502 bad_gateway", "connection ServerDisconnectedError", …
    detail: str  # the start of the answer's body, if any
    began: float  # monotonic
    ended: float


def with_message(cause: str, body: bytes) -> str:
    """The cause with the gateway's error message, when the answer has one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return cause
    return f"{cause}: {message}" if isinstance(message, str) else cause


class Load:
    """Closed-loop normal clients posting to the stable URL; every outcome kept by id.

    ``active`` clients send (the rest wait), so a scenario can ramp the load; ``think``
    pauses each client between requests; ``fresh`` opens a new connection per request."""

    def __init__(
        self,
        port: int,
        name: str,
        clients: int = CLIENTS,
        *,
        fresh: bool = False,
        host: str = HOST,
        active: int | None = None,
    ) -> None:
        self.url = f"http://{LOOPBACK}:{port}/v1/predict"
        self.name = name
        self.clients = clients
        self.active = clients if active is None else active
        self.think = 0.0
        self.fresh = fresh
        self.host = host
        self.sent = 0
        self.ok = 0
        self.failures: dict[str, Failure] = {}  # by request id
        self.versions: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=self.fresh),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
            auto_decompress=False,
        )
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> None:
        """Let every client finish the request it has in flight, then close."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLIENT_TIMEOUT_S + 5)
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _client(self, index: int) -> None:
        assert self._session is not None
        session = self._session
        n = 0
        while not self._stop.is_set():
            if index >= self.active:
                await asyncio.sleep(0.05)
                continue
            n += 1
            rid = f"{self.name}-{index}-{n}"
            headers = {"Host": self.host, "X-Request-Id": rid, "Content-Type": "application/json"}
            self.sent += 1
            began = time.monotonic()
            started = time.perf_counter()
            cause = detail = ""
            try:
                async with session.post(self.url, data=PAYLOAD, headers=headers) as resp:
                    body = await resp.read()
                    cause = failure_reason(resp.status, body)
                    detail = body[:300].decode(errors="replace")
                    if cause:
                        cause = with_message(cause, body)
                    if not cause:
                        self.ok += 1
                        self.versions[resp.headers.get("X-Model-Version", "-")] += 1
                        self.latencies.append(time.perf_counter() - started)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                cause = exception_kind(exc)
            if cause:
                self.failures[rid] = Failure(cause, detail, began, time.monotonic())
                await asyncio.sleep(0.01)  # no busy loop against a refusing gateway
            elif self.think:
                await asyncio.sleep(self.think)
