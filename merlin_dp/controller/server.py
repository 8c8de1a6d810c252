"""Running the controller: store, runtime, API, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from merlin_dp.autoscaler.policy import PolicyConfig
from merlin_dp.common.net import bind_socket
from merlin_dp.controller.api import make_app
from merlin_dp.controller.auth import Tokens, model_roots
from merlin_dp.controller.http_server import ApiRunner
from merlin_dp.controller.redis_store import RedisStore
from merlin_dp.controller.service import Controller
from merlin_dp.controller.statedir import StateDirInUse, StateDirLock
from merlin_dp.controller.store import FileStore, Store, StoreError
from merlin_dp.controller.urls import PublicGateway
from merlin_dp.runtime.local import LocalRuntime, LocalTimings

log = logging.getLogger("controller")


@dataclass(frozen=True)
class ControllerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8090
    tokens_file: Path | None = None
    # Where tokens without host may deploy pyfunc / sklearn models from (docs/security.md).
    model_roots: tuple[Path, ...] = ()
    max_versions: int = 2
    domain: str = "localhost"
    # Where clients reach the gateway(s), for the URLs the API answers with.
    public_http_port: int = 8080
    public_grpc_port: int | None = 8082
    runtime: str = "local"  # local | none
    store: str = ""  # "" (a file under state_dir) or redis://host:port/db
    drain_seconds: float = 2.0
    # Gateways' admin URLs to read request signals from: runs the autoscaler beside the
    # controller (needs a runtime). Empty: no autoscaling.
    gateway_admin_urls: tuple[str, ...] = ()
    # Or read the signals gateways push to the Redis store (needs store=redis://...).
    redis_signals: bool = False
    autoscaler_timings: PolicyConfig | None = None
    # Kubernetes mode: routing state from ModelEndpoints and EndpointSlices.
    kubernetes: bool = False
    kube_api: str = ""  # a plain-HTTP API URL (kubectl proxy); default: in-cluster/kubeconfig
    kubeconfig: str = ""
    namespace: str = ""  # default: the pod's namespace
    leader_election: bool = True
    identity: str = ""  # default: host name and pid
    lease_seconds: float = 15.0
    resync_seconds: float = 300.0
    # Kubernetes mode: find every gateway's admin port through this headless Service's
    # EndpointSlices and run the autoscaler on their signals.
    gateway_admin_service: str = ""


class StartError(Exception):
    """The controller could not start, and nothing it began is left running; the message
    is one line for the user."""


def listen_error(host: str, port: int, what: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += f" (ss -ltnp 'sport = :{port}' shows by whom)"
    return f"cannot listen on {host}:{port} for {what}: {reason}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ClientFaultFilter(logging.Filter):
    """aiohttp logs a malformed request (the client's fault, answered 400) as an error with
    a trace; a client could fill the log with them. Keep them at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


async def start_controller(
    config: ControllerConfig, *, before_start: Callable[[], None] | None = None
) -> tuple[Controller, web.AppRunner, int]:
    """Lock the state directory, bind the API's socket, then start; raises StartError
    (state directory in use, address taken) before touching anything.
    ``before_start`` runs between the bind and the start: more checks of the caller's."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultFilter) for f in server_log.filters):
        server_log.addFilter(_ClientFaultFilter())
    tokens = Tokens.load(config.tokens_file, os.environ.get("MERLIN_DP_TOKENS"))
    if not tokens.enabled and not is_loopback(config.host):
        raise SystemExit(
            f"merlin-dp controller: refusing to serve {config.host} with no tokens; "
            "give --tokens FILE (or MERLIN_DP_TOKENS), or listen on 127.0.0.1"
        )
    try:
        roots = model_roots(config.model_roots)
    except ValueError as exc:
        raise SystemExit(f"merlin-dp controller: {exc}") from None
    redis = config.store.startswith(("redis://", "rediss://", "unix://"))
    if config.store and not redis:
        raise SystemExit(f"merlin-dp controller: --store {config.store!r} is not redis://…")
    local_runtime = config.runtime == "local" and not config.kubernetes
    lock = None
    if not redis or local_runtime:  # the file store or the replica records live there
        lock = StateDirLock(config.state_dir)
        try:
            lock.acquire()
        except StateDirInUse as exc:
            raise StartError(str(exc)) from None
    sock = None
    controller: Controller | None = None
    runner: web.AppRunner | None = None
    try:
        try:
            sock = bind_socket(config.host, config.port, reuse_port=False)
        except OSError as exc:
            raise StartError(listen_error(config.host, config.port, "the API", exc)) from None
        if before_start is not None:
            before_start()
        if not tokens.enabled:
            log.warning("no API tokens configured: the API is open, bound to %s only", config.host)
        store: Store = RedisStore(config.store) if redis else FileStore(config.state_dir)
        public = PublicGateway(config.domain, config.public_http_port, config.public_grpc_port)
        controller = Controller(store, None, max_versions=config.max_versions, public=public)
        controller.state_dir_lock, lock = lock, None  # released by controller.close()
        if local_runtime:
            runtime = LocalRuntime(
                config.state_dir / "runtime",
                controller.on_runtime_event,
                LocalTimings(drain_seconds=config.drain_seconds),
            )
            runtime.reap_orphans()
            controller.runtime = runtime
        try:
            await controller.start()
        except StoreError as exc:
            raise StartError(str(exc)) from None
        if config.kubernetes:
            await _follow_cluster(controller, config)
        # A watcher that went away cancels its handler; stopping waits for requests briefly.
        runner = ApiRunner(
            make_app(controller, tokens, roots),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        # Nothing half-started stays behind: replicas, orphans taken over, the lock.
        if runner is not None:
            await runner.cleanup()
        if sock is not None:
            sock.close()
        if controller is not None:
            await controller.close()
        if lock is not None:
            lock.release()
        raise
    port: int = sock.getsockname()[1]
    log.info("controller API on http://%s:%d (state in %s)", config.host, port, config.state_dir)
    return controller, runner, port


async def _follow_cluster(controller: Controller, config: ControllerConfig) -> None:
    from merlin_dp.controller.kubernetes.client import api_client, default_namespace
    from merlin_dp.controller.kubernetes.sync import KubernetesSync

    api = await api_client(config.kube_api, config.kubeconfig)
    sync = KubernetesSync(
        controller, api, config.namespace or default_namespace(),
        identity=config.identity or None, leader_election=config.leader_election,
        lease_seconds=config.lease_seconds, renew_deadline_seconds=config.lease_seconds * 2 / 3,
        retry_seconds=config.lease_seconds / 7.5, resync_seconds=config.resync_seconds,
    )  # fmt: skip
    await sync.start()
    log.info("following ModelEndpoints and EndpointSlices in namespace %s as %s", sync.namespace,
             sync.identity)  # fmt: skip


async def serve(config: ControllerConfig) -> None:
    from merlin_dp.autoscaler.collector import GatewaySignals, RedisSignals, SignalSource
    from merlin_dp.controller.autoscaling import attach_autoscaler
    from merlin_dp.controller.kubernetes.sync import KubernetesSync
    from merlin_dp.controller.rollouts import attach_rollouts
    from merlin_dp.controller.timeseries import TimeSeries

    controller, runner, _ = await start_controller(config)
    scaler = None
    signals: SignalSource | None = None
    if config.gateway_admin_urls:
        signals = GatewaySignals(config.gateway_admin_urls)
    elif config.gateway_admin_service and isinstance(controller.cluster, KubernetesSync):
        pulled = GatewaySignals([])

        def found(urls: list[str]) -> None:
            pulled.admin_urls[:] = urls

        controller.cluster.follow_gateways(config.gateway_admin_service, found)
        signals = pulled
    elif config.redis_signals:
        signals = RedisSignals(config.store)
    runtime = controller.runtime
    if isinstance(controller.cluster, KubernetesSync):
        runtime = controller.cluster.runtime
    if signals is not None and runtime is not None:
        scaler = attach_autoscaler(
            controller, signals, timings=config.autoscaler_timings, runtime=runtime
        )
    rollouts = attach_rollouts(controller, signals, poll=scaler is None) if signals else None
    series = controller.series = TimeSeries(lambda: controller.state, signals, scaler)
    series.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await series.close()
    if rollouts is not None:
        await rollouts.close()
    if scaler is not None:
        await scaler.close()
    await controller.feed.close()
    await runner.cleanup()
    await controller.close()
