"""Running the gateway: one process, or a supervisor over N worker processes.

With one worker everything (traffic, route source, admin port) shares one event loop.
With ``--workers N`` this process binds nothing but the admin port: it starts N worker
processes that each bind the traffic port with SO_REUSEPORT, restarts any that die,
and answers ``/metrics`` and ``/readyz`` by asking every worker for its report over a
unix socket and merging them. Workers exit when the supervisor does.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from merlin_dp.common import hot_path
from merlin_dp.common.aio import raise_if_cancelling
from merlin_dp.gateway.admin import admin_app, start_admin
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.metrics_snapshot import empty_snapshot
from merlin_dp.gateway.routing.sources import (
    ControllerRouteSource,
    FileRouteSource,
    RedisRouteSource,
    RouteSource,
)
from merlin_dp.gateway.worker import GatewayWorker, Report

log = logging.getLogger("gateway")


def make_source(config: GatewayConfig) -> RouteSource:
    if config.controller_url is not None:
        return ControllerRouteSource(config.controller_url, config.controller_token)
    if config.redis_url is not None:
        return RedisRouteSource(config.redis_url)
    if config.routes_file is None:
        raise SystemExit(
            "merlin-dp gateway: no route source; "
            "pass --routes FILE, --controller URL or --redis URL"
        )
    return FileRouteSource(config.routes_file, config.reload_seconds)


def run(config: GatewayConfig, log_level: str = "INFO") -> None:
    make_source(config)  # fail before starting anything if there's no source
    if config.workers == 1:
        uvloop.run(_serve_single(config))
    else:
        uvloop.run(_supervise(config, log_level))


async def _wait_for_stop(source: RouteSource | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if source is not None:
        loop.add_signal_handler(signal.SIGHUP, source.poke)
    await stop.wait()


async def _serve_single(config: GatewayConfig) -> None:
    worker = GatewayWorker(config, make_source(config))
    await worker.start()

    async def reports() -> list[Report]:
        return [worker.report()]

    admin, admin_port = await start_admin(admin_app(reports), config.admin_host, config.admin_port)
    log.info(
        "gateway serving http://%s:%d (admin http://%s:%d, routes from %s; hot path %s)",
        config.host, worker.port, config.admin_host, admin_port, worker.source.description,
        hot_path.state,
    )  # fmt: skip
    await _wait_for_stop(worker.source)
    log.info("gateway stopping: finishing in-flight requests")
    await worker.stop()
    await admin.cleanup()


# --- several workers ----------------------------------------------------------------


def _worker_process(config: GatewayConfig, report_socket: str, parent: int, log_level: str) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker-{os.getpid()} %(message)s")
    uvloop.run(_worker_main(config, report_socket, parent))


async def _worker_main(config: GatewayConfig, report_socket: str, parent: int) -> None:
    worker = GatewayWorker(config, make_source(config))
    await worker.start()

    async def report(_: web.Request) -> web.Response:
        return web.json_response(worker.report())

    app = web.Application()
    app.router.add_get("/report", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, report_socket).start()

    async def orphaned() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)

    waits = [
        asyncio.ensure_future(_wait_for_stop(worker.source)),
        asyncio.ensure_future(orphaned()),
    ]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await worker.stop()
    await runner.cleanup()


class _Workers:
    """The worker processes, their report sockets, and restarts."""

    def __init__(self, config: GatewayConfig, log_level: str) -> None:
        self.config = config
        self.log_level = log_level
        self.dir = Path(tempfile.mkdtemp(prefix="merlin-gateway-"))
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess | None] = [None] * config.workers
        self.stopping = False

    def socket_path(self, i: int) -> str:
        return str(self.dir / f"worker-{i}.sock")

    def spawn(self, i: int) -> None:
        path = self.socket_path(i)
        if os.path.exists(path):
            os.unlink(path)
        proc = self.ctx.Process(
            target=_worker_process,
            args=(self.config, path, os.getpid(), self.log_level),
            name=f"gateway-worker-{i}",
        )
        proc.start()
        self.procs[i] = proc

    async def watch(self) -> None:
        while not self.stopping:
            for i, proc in enumerate(self.procs):
                if proc is not None and not proc.is_alive() and not self.stopping:
                    log.error("gateway worker %d exited with %s; restarting", i, proc.exitcode)
                    self.spawn(i)
            await asyncio.sleep(0.5)

    async def reports(self) -> list[Report]:
        return list(await asyncio.gather(*(self._report(i) for i in range(len(self.procs)))))

    async def _report(self, i: int) -> Report:
        try:
            connector = aiohttp.UnixConnector(path=self.socket_path(i))
            timeout = aiohttp.ClientTimeout(total=2.0)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get("http://worker/report") as resp,
            ):
                report: Report = await resp.json()
                return report
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise_if_cancelling()
            return {
                "ready": False,
                "revision": -1,
                "source": "",
                "source_connected": False,
                "last_error": f"worker {i} is not answering: {exc or type(exc).__name__}",
                "last_error_at": None,
                "applied_at": None,
                "metrics": empty_snapshot(),
            }

    async def stop(self) -> None:
        self.stopping = True
        live = [p for p in self.procs if p is not None and p.is_alive()]
        for proc in live:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_seconds + 5
        while any(p.is_alive() for p in live) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for proc in live:
            if proc.is_alive():
                proc.kill()
            proc.join(1)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _supervise(config: GatewayConfig, log_level: str) -> None:
    # Hold the port (bound, not listening) so every worker gets the same one, even for
    # port 0; with SO_REUSEPORT a non-listening socket receives no connections.
    holder = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((config.host, config.port))
    config = replace(config, port=holder.getsockname()[1])
    workers = _Workers(config, log_level)
    for i in range(config.workers):
        workers.spawn(i)
    watcher = asyncio.ensure_future(workers.watch())
    admin, admin_port = await start_admin(
        admin_app(workers.reports), config.admin_host, config.admin_port
    )
    log.info(
        "gateway supervisor: %d workers serving http://%s:%d (admin http://%s:%d; hot path %s)",
        config.workers, config.host, config.port, config.admin_host, admin_port,
        hot_path.state,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _forward_signal(workers, signal.SIGHUP))
    await stop.wait()
    watcher.cancel()
    await workers.stop()
    await admin.cleanup()
    holder.close()


def _forward_signal(workers: _Workers, sig: signal.Signals) -> None:
    for proc in workers.procs:
        if proc is not None and proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, sig)
