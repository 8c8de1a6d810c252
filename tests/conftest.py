"""Shared test fixtures: real replicas, a real gateway, free ports, uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
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

from loadtests.harness.ports import wait_for_port
from loadtests.harness.processes import ChildProcess, ProcessSet
from loadtests.harness.procfs import status_bytes
from loadtests.harness.systems import redis_argv
from loadtests.harness.tools import find_tool
from merlin_dp.common.net import LOOPBACK, free_port
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import FileRouteSource
from merlin_dp.gateway.worker import GatewayWorker
from tests.clients import CLIENT_ENVS, build_in_background, install_browser_in_background
from tests.upstream_app import make_app

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_finish(session: pytest.Session) -> None:
    # The client venvs (tests/clients.py) the collected tests ask for, made meanwhile.
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    build_in_background(env for env in CLIENT_ENVS if env.fixture in wanted)
    if "browser" in wanted:  # tests/test_console.py
        install_browser_in_background()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # The gateway runs on uvloop in production, so its tests do too.
    return {"uvloop": uvloop.new_event_loop}


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
    """Until 127.0.0.1:`port` accepts a connection (the harness's wait, tests' timeout)."""
    wait_for_port(LOOPBACK, port, timeout=timeout)


class Proc(ChildProcess):
    """A real process a test starts from the checkout, and the port it serves; its log is
    named after the file."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        super().__init__(log.stem, args, log_path=log, cwd=ROOT)
        self.port = port
        self.log = log

    def stop(self, grace_seconds: float = 10.0) -> bool:
        return super().stop(grace_seconds)

    def rss_bytes(self) -> int:
        return self._status_bytes("VmRSS")

    def peak_rss_bytes(self) -> int:
        return self._status_bytes("VmHWM")

    def _status_bytes(self, field_name: str) -> int:
        found = status_bytes(self.pid, field_name)
        if found is None:
            raise AssertionError(f"no {field_name}")
        return found


class Procs(ProcessSet):
    """Real processes a test starts; all stopped, newest first, when the test ends."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.tmp = tmp

    @property
    def started(self) -> list[ChildProcess]:
        return self.processes

    def replica(self, name: str) -> Proc:
        port = free_port()
        p = Proc(
            [sys.executable, "-m", "tests.upstream_app", "--port", str(port), "--name", name],
            port,
            self.tmp / f"{name}.log",
        )
        self.processes.append(p)
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
        self.processes.append(p)
        wait_port(port)
        wait_port(admin)
        return p, admin


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(tmp_path)
    yield made
    made.stop_all()


# --- a real redis-server of the test's own ------------------------------------------


class RedisServer:
    """redis-server on a port of its own, its data in an append-only file that a restart
    (:meth:`kill`, then :meth:`start`) reads back."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.log = tmp / "redis.log"
        self.proc: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = find_tool("redis-server") or "/usr/bin/redis-server"
        argv = redis_argv(binary, self.port, self.dir)
        self.proc = ChildProcess("redis", argv, log_path=self.log)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and not self.proc.exited():
            self.proc.kill(signal.SIGKILL)
            self.proc.popen.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


class Up:
    """`merlin-dp up` as a process, on free ports."""

    def __init__(
        self, tmp: Path, state: Path, name: str = "up", extra: tuple[str, ...] = ()
    ) -> None:
        self.port, self.admin, self.api_port, self.grpc_port = (free_port() for _ in range(4))
        self.log = tmp / f"{name}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "merlin_dp", "up", "--state-dir", str(state),
             "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin}",
             "--api", f"127.0.0.1:{self.api_port}", "--grpc-port", str(self.grpc_port), *extra],
            cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while "merlin-dp is up." not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


@contextlib.contextmanager
def running_up(tmp: Path, *extra: str) -> Iterator[Up]:
    """`merlin-dp up` on free ports for the block, stopped after it; its log must hold
    no traceback."""
    server = Up(tmp, tmp / "state", extra=extra)
    try:
        server.wait_up()
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-4000:]


@contextlib.contextmanager
def running_controller(tmp: Path, tokens: str) -> Iterator[str]:
    """`merlin-dp controller` with the tokens file ``tokens`` (YAML) on a free port, for
    the block: its API's URL. Its log must hold no traceback."""
    (tmp / "tokens.yaml").write_text(tokens)
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(tmp / "state"),
         "--listen", f"127.0.0.1:{port}", "--tokens", str(tmp / "tokens.yaml")],
        port, tmp / "controller.log",
    )  # fmt: skip
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()
    log = (tmp / "controller.log").read_text()
    assert "Traceback" not in log, log[-4000:]
