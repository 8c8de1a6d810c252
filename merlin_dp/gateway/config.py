"""Gateway settings: one frozen value built by the CLI (or a test) and handed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merlin_dp.gateway.activation import ActivationLimits
from merlin_dp.gateway.http.proxy import ProxyLimits
from merlin_dp.gateway.pool.upstream import PoolLimits


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # The gRPC (UPI_V1) listener on the traffic host; None: not served.
    grpc_port: int | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    domain: str = "localhost"
    routes_file: Path | None = None
    controller_url: str | None = None
    controller_token: str | None = None
    redis_url: str | None = None
    # Where to poke the autoscaler when requests wait at zero (default: the controller).
    activate_url: str | None = None
    workers: int = 1
    reload_seconds: float = 1.0
    keepalive_seconds: float = 75.0
    # A request head must be whole this long after its first byte (slowloris): else 408.
    header_timeout_seconds: float = 10.0
    # Open client connections per worker; past it new ones get 503 and are closed.
    max_connections: int = 10_000
    # Grace for in-flight requests when the gateway stops.
    shutdown_seconds: float = 10.0
    max_line_bytes: int = 8190
    max_header_bytes: int = 8190
    proxy: ProxyLimits = field(default_factory=ProxyLimits)
    pool: PoolLimits = field(default_factory=PoolLimits)
    activation: ActivationLimits = field(default_factory=ActivationLimits)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0 < self.proxy.buffer_body_bytes <= 1024 * 1024:
            raise ValueError("buffer_body_bytes must be between 1 byte and 1 MiB")
        if self.header_timeout_seconds <= 0 or self.max_connections < 1:
            raise ValueError("header timeout must be positive and max connections at least 1")
        if self.activation.max_waiting < 0 or self.activation.timeout <= 0:
            raise ValueError("activation queue must not be negative and its timeout positive")
        if self.grpc_port is not None and not 0 <= self.grpc_port < 65536:
            raise ValueError("grpc_port must be between 0 and 65535")
        if self.proxy.max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        if self.pool.max_head_bytes < 1024 or self.pool.max_headers < 1:
            raise ValueError("a replica's response head must be allowed 1 KiB and 1 header")
