"""One gateway worker: the traffic listener, its route source and its counters.

A worker owns everything bound to its event loop: the upstream registry, the HTTP/1.1
connection pool, the metrics, the proxy handler and the listener.
:meth:`GatewayWorker.apply` compiles a route table spec and swaps it in with one
assignment, then drains the replicas the new table no longer names. With ``--workers N``
each worker is its own process bound to the same port with SO_REUSEPORT (see
:mod:`merlin_dp.gateway.supervisor`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

from merlin_dp.common.aio import cancel_and_wait
from merlin_dp.common.net import bind_socket
from merlin_dp.gateway.activation import Activator, HttpPoke
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.grpc.proxy import GrpcProxy
from merlin_dp.gateway.h2.server import H2Listener
from merlin_dp.gateway.http.front import HttpFront
from merlin_dp.gateway.http.proxy import Proxy
from merlin_dp.gateway.http.settings import FrontSettings
from merlin_dp.gateway.metrics import GatewayMetrics
from merlin_dp.gateway.pool.http1 import Http1Pool
from merlin_dp.gateway.pool.upstream import UpstreamRegistry
from merlin_dp.gateway.routing.sources import RouteSource
from merlin_dp.gateway.routing.table import compile_table
from merlin_dp.gateway.signal_push import RedisSignalPusher
from merlin_dp.gateway.signals import SignalRecorder
from merlin_dp.spec.routes import RouteTableSpec

log = logging.getLogger("gateway")

Report = dict[str, Any]


class GatewayWorker:
    def __init__(self, config: GatewayConfig, source: RouteSource) -> None:
        loop = asyncio.get_running_loop()
        self.config = config
        self.source = source
        self.registry = UpstreamRegistry(loop, config.pool)
        self.http1 = Http1Pool(loop, config.pool, self.registry.stats)
        self.registry.on_drain(self.http1.drop)
        self.metrics = GatewayMetrics(self.registry.stats)
        self.proxy = Proxy(self.metrics, self.http1, config.proxy)
        activate_url = config.activate_url or config.controller_url
        self.poke = HttpPoke(activate_url, config.controller_token) if activate_url else None
        self.activator = Activator(self.metrics, config.activation, self.poke)
        self.proxy.activator = self.activator
        self.grpc: GrpcProxy | None = None
        self.grpc_listener: H2Listener | None = None
        if config.grpc_port is not None:
            self.grpc = GrpcProxy(self.metrics, config.pool, self.activator)
            self.grpc_listener = H2Listener(self.grpc)
        self.grpc_port = config.grpc_port
        self.signals = SignalRecorder(self.metrics.versions, self.metrics.mirrors)
        # With Redis, signals are pushed too: an autoscaler needn't know every gateway.
        self.pusher = (
            RedisSignalPusher(config.redis_url, self.signals) if config.redis_url else None
        )
        self._push_task: asyncio.Task[None] | None = None
        self.ready = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.applied_at: float | None = None
        self.front: HttpFront | None = None
        self._source_task: asyncio.Task[None] | None = None
        self.port = config.port

    # --- route tables ---------------------------------------------------------------

    def apply(self, spec: RouteTableSpec) -> None:
        table = compile_table(spec, self.config.domain, self.registry, self.metrics.version)
        self.proxy.table = table
        if self.grpc is not None:
            self.grpc.table = table
        self.activator.table_swapped(table)
        self.registry.retain(table.upstreams())
        self.metrics.table_revision = table.revision
        self.ready = True
        self.applied_at = time.time()
        log.info(
            "serving route table revision %d: %d model endpoints, %d version endpoints",
            table.revision,
            len(spec.model_endpoints),
            len(table.versions),
        )

    def reject(self, reason: str) -> None:
        self.metrics.table_errors += 1
        self.last_error = reason
        self.last_error_at = time.time()

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        tune_gc()
        settings = FrontSettings(
            max_line_bytes=cfg.max_line_bytes,
            max_header_bytes=cfg.max_header_bytes,
            header_timeout=cfg.header_timeout_seconds,
            keepalive=cfg.keepalive_seconds,
            max_connections=cfg.max_connections,
        )
        self.front = HttpFront(self.proxy.handle, settings, self.metrics.connections)
        sock = bind_socket(cfg.host, cfg.port, reuse_port=cfg.workers > 1)
        self.port = sock.getsockname()[1]
        await self.front.start(sock)
        if self.grpc_listener is not None and cfg.grpc_port is not None:
            grpc_sock = bind_socket(cfg.host, cfg.grpc_port, reuse_port=cfg.workers > 1)
            self.grpc_port = grpc_sock.getsockname()[1]
            await self.grpc_listener.start(grpc_sock)
            # Named in the HTTP port's answer to a request for a UPI_V1 endpoint.
            self.proxy.grpc_port = self.grpc_port
        self._source_task = asyncio.create_task(self.source.run(self.apply, self.reject))
        self.signals.start()
        if self.pusher is not None:
            self._push_task = asyncio.create_task(self.pusher.run())

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to the grace), close pools."""
        self.signals.stop()
        if self._push_task is not None:
            await cancel_and_wait([self._push_task])
        if self._source_task is not None:
            await cancel_and_wait([self._source_task])
        if self.grpc_listener is not None:
            # GOAWAY to every client, then in-flight calls finish within the grace.
            await self.grpc_listener.stop(self.config.shutdown_seconds)
        if self.front is not None:
            await self.front.stop(self.config.shutdown_seconds)
        if self.grpc is not None:
            await self.grpc.close()
        await self.proxy.mirroring.close()
        await self.activator.close()
        if self.poke is not None:
            await self.poke.close()
        self.registry.close()
        self.http1.close()

    def report(self) -> Report:
        return {
            "pid": os.getpid(),
            "ready": self.ready,
            "revision": self.proxy.table.revision,
            "source": self.source.description,
            "source_connected": self.source.connected,
            "last_error": self.source.last_error or self.last_error,
            "last_error_at": self.last_error_at,
            "applied_at": self.applied_at,
            "metrics": self.metrics.snapshot(source_connected=self.source.connected),
            "signals": list(self.signals.history),
        }


def tune_gc() -> None:
    """Fewer, cheaper collections for a process that allocates many short-lived objects.

    Each request allocates a few dozen containers that die young; at the default
    threshold (700) a gen-0 collection runs every few requests. Everything alive at
    start-up (modules, the app) is frozen out of the collector's view for good.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
