"""Model URLs: where clients reach a model or version endpoint through the gateway.

The one place they are built: the API's ``url`` fields, and what ``merlin-dp up``
prints. The host is ``<name>.<project>.<domain>`` (the gateway routes by it), the port
the gateway's public one. HTTP_JSON gets ``http://host:port``; UPI_V1 gets the gRPC
target ``host:port`` — what grpcio's ``grpc.insecure_channel(target)`` takes, with the
host also becoming the ``:authority`` the gateway routes by. (A ``grpc://`` form would
have to be rewritten before grpcio accepts it.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PublicGateway:
    """How clients reach the gateway: ``merlin-dp up`` knows its own; a standalone
    controller is told (``--domain``, ``--public-http-port``, ``--public-grpc-port``)."""

    domain: str = "localhost"
    http_port: int = 8080
    grpc_port: int | None = 8082  # None: no gateway serves gRPC


def model_url(gateway: PublicGateway, project: str, name: str, protocol: str) -> str:
    """``name`` is the model (its model endpoint) or ``model-version`` (a version endpoint).
    Empty for UPI_V1 when no gateway serves gRPC."""
    host = f"{name}.{project}.{gateway.domain}"
    if protocol == "UPI_V1":
        return f"{host}:{gateway.grpc_port}" if gateway.grpc_port is not None else ""
    return f"http://{host}" if gateway.http_port == 80 else f"http://{host}:{gateway.http_port}"
