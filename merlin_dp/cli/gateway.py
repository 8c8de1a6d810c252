"""`merlin-dp gateway`: arguments to a GatewayConfig, then run it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from merlin_dp.gateway.activation import ActivationLimits
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.http.proxy import ProxyLimits
from merlin_dp.gateway.pool.upstream import PoolLimits


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the traffic gateway",
        description=(
            "Serve model endpoints and version endpoints over HTTP_JSON. Requests are "
            "routed by Host (<model>.<project>.<domain>, <model>-<version>.<project>.<domain>) "
            "or by the path form /serving/<project>/<model>/... for clients that can't set "
            "Host. Route tables come from --routes FILE (re-read when it changes, or on SIGHUP) "
            "or from the controller's stream (--controller URL)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--routes", type=Path, metavar="FILE", help="route table file (YAML or JSON)")
    p.add_argument("--controller", metavar="URL",
                   help="follow the controller's route-table stream instead of a file")  # fmt: skip
    p.add_argument("--redis", metavar="URL",
                   help="follow the route tables controllers publish in Redis")  # fmt: skip
    p.add_argument("--controller-token", metavar="TOKEN", default=os.environ.get("MERLIN_DP_TOKEN"),
                   help="read-only API token (default: $MERLIN_DP_TOKEN)")  # fmt: skip
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="traffic address; 0.0.0.0:8080 to serve other machines")  # fmt: skip
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="serve UPI_V1 (gRPC, h2c) model endpoints on this port of the --listen "
                   "host; off when absent")  # fmt: skip
    p.add_argument("--admin", default="127.0.0.1:8081", metavar="HOST:PORT",
                   help="admin address: /metrics, /healthz, /readyz")  # fmt: skip
    p.add_argument("--domain", default="localhost",
                   help="domain of model URLs: <model>.<project>.<domain>")  # fmt: skip
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the traffic port (SO_REUSEPORT)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=ProxyLimits().max_body_bytes,
                   help="request bodies over this are refused with 413")  # fmt: skip
    p.add_argument("--idle-upstream-seconds", type=float, default=PoolLimits().idle_seconds,
                   help="close pooled replica connections idle this long")  # fmt: skip
    p.add_argument("--max-upstream-head-bytes", type=int, default=PoolLimits().max_head_bytes,
                   help="a replica's response head longer than this is answered 502")  # fmt: skip
    p.add_argument("--max-upstream-headers", type=int, default=PoolLimits().max_headers,
                   help="a replica's response with more headers is answered 502")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request head must arrive whole this soon after its first byte "
                   "(else 408: slowloris)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="open client connections per worker; more are answered 503")  # fmt: skip
    p.add_argument("--activate-url", metavar="URL",
                   help="where to tell the autoscaler requests wait for a version at zero "
                   "(default: --controller)")  # fmt: skip
    p.add_argument("--activation-timeout", type=float, default=ActivationLimits().timeout,
                   help="seconds a request may wait for a version to start from zero")  # fmt: skip
    p.add_argument("--activation-queue", type=int, default=ActivationLimits().max_waiting,
                   help="requests per version and worker that may wait at zero")  # fmt: skip
    p.add_argument("--shutdown-seconds", type=float, default=10.0,
                   help="grace for in-flight requests on SIGTERM")  # fmt: skip
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"merlin-dp: {text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args: argparse.Namespace) -> int:
    from merlin_dp.gateway import supervisor

    host, port = split_address(args.listen)
    admin_host, admin_port = split_address(args.admin)
    try:
        config = GatewayConfig(
            host=host,
            port=port,
            grpc_port=args.grpc_port,
            admin_host=admin_host,
            admin_port=admin_port,
            domain=args.domain,
            routes_file=args.routes,
            controller_url=args.controller,
            controller_token=args.controller_token,
            redis_url=args.redis,
            workers=args.workers,
            shutdown_seconds=args.shutdown_seconds,
            proxy=ProxyLimits(max_body_bytes=args.max_body_bytes),
            pool=PoolLimits(
                idle_seconds=args.idle_upstream_seconds,
                max_head_bytes=args.max_upstream_head_bytes,
                max_headers=args.max_upstream_headers,
            ),
            activate_url=args.activate_url,
            header_timeout_seconds=args.header_timeout,
            max_connections=args.max_connections,
            activation=ActivationLimits(
                max_waiting=args.activation_queue, timeout=args.activation_timeout
            ),
        )
    except ValueError as exc:
        raise SystemExit(f"merlin-dp gateway: {exc}") from None
    supervisor.run(config, args.log_level)
    return 0
