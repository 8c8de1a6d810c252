"""Shared test fixtures: real replicas, a real gateway, free ports, uvloop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import FileRouteSource
from merlin_dp.gateway.worker import GatewayWorker
from tests.upstream_app import make_app

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # The gateway runs on uvloop in production, so its tests do too.
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Replica:
    """A replica served on the test's own loop, over a real socket."""

    def __init__(self, name: str, app: web.Application | None = None) -> None:
        self.name = name
        self.app = app or make_app(name)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> Replica:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def version(
    project: str, model: str, ver: str, replicas: list[str], **extra: Any
) -> dict[str, Any]:
    return {"project": project, "model": model, "version": ver, "replicas": replicas, **extra}


def model_endpoint(
    project: str, model: str, weights: dict[str, int], **rule: Any
) -> dict[str, Any]:
    dests = [{"version": v, "weight": w} for v, w in weights.items()]
    return {"project": project, "model": model, "rule": {"destinations": dests, **rule}}


def write_routes(path: Path, spec: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, path)


class Gateway:
    """A gateway worker on the test's loop, fed by a route file the test rewrites."""

    def __init__(self, tmp: Path, config: GatewayConfig | None = None) -> None:
        self.routes = tmp / "routes.json"
        base = config or GatewayConfig()
        self.config = GatewayConfig(
            **{**base.__dict__, "port": 0, "routes_file": self.routes, "reload_seconds": 0.05}
        )
        self.worker: GatewayWorker | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, spec: dict[str, Any]) -> Gateway:
        write_routes(self.routes, spec)
        self.worker = GatewayWorker(self.config, FileRouteSource(self.routes, 0.05))
        await self.worker.start()
        await self.wait_revision(spec.get("revision", 0))
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        return self

    async def set_routes(self, spec: dict[str, Any]) -> None:
        write_routes(self.routes, spec)
        assert self.worker is not None
        self.worker.source.poke()
        await self.wait_revision(spec["revision"])

    async def wait_revision(self, revision: int) -> None:
        assert self.worker is not None
        for _ in range(200):
            if self.worker.ready and self.worker.proxy.table.revision == revision:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"gateway never served revision {revision}: {self.worker.report()}")

    @property
    def port(self) -> int:
        assert self.worker is not None
        return self.worker.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(
        self, method: str, host: str, path: str, **kwargs: Any
    ) -> aiohttp.client._RequestContextManager:
        assert self.session is not None
        headers = {"Host": host, **kwargs.pop("headers", {})}
        return self.session.request(method, self.url(path), headers=headers, **kwargs)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.worker is not None:
            await self.worker.stop()


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for r in started:
        await r.stop()


async def start_replicas(into: list[Replica], *names: str) -> list[Replica]:
    out = [await Replica(n).start() for n in names]
    into.extend(out)
    return out


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Gateway] = []

    async def make(spec: dict[str, Any], config: GatewayConfig | None = None) -> Gateway:
        gw = await Gateway(tmp_path, config).start(spec)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.stop()


# --- real processes ---------------------------------------------------------------


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listening on port {port} after {timeout} s")


class Proc:
    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        self._log_file.close()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def peak_rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


class Procs:
    """Real processes a test starts; all stopped when the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def replica(self, name: str) -> Proc:
        port = free_port()
        p = Proc(
            [sys.executable, "-m", "tests.upstream_app", "--port", str(port), "--name", name],
            port,
            self.tmp / f"{name}.log",
        )
        self.started.append(p)
        wait_port(port)
        return p

    def gateway(self, routes: Path, *extra: str) -> tuple[Proc, int]:
        """`merlin-dp gateway` as a process; returns it and its admin port."""
        port, admin = free_port(), free_port()
        p = Proc(
            [sys.executable, "-m", "merlin_dp", "gateway", "--routes", str(routes),
             "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *extra],
            port,
            self.tmp / f"gateway-{port}.log",
        )  # fmt: skip
        self.started.append(p)
        wait_port(port)
        wait_port(admin)
        return p, admin

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(tmp_path)
    yield made
    made.stop_all()


# --- a real redis-server of the test's own ------------------------------------------


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
