"""The route table as data: what a route source hands the gateway.

A route table spec lists every model endpoint with its rule and every version endpoint
with its ready replicas. It arrives from a YAML/JSON route file, the controller's watch
stream or Redis; either way it is validated whole here, before the gateway
compiles it. A spec that fails validation never replaces the table being served.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from merlin_dp.spec.endpoints import ModelEndpointSpec
from merlin_dp.spec.rule import Name, Protocol, StrictModel, VersionId, full_name


class RouteFileError(ValueError):
    """A route file that can't be read or doesn't validate; the message says where."""


class RouteTableVersionEndpoint(StrictModel):
    """A version endpoint as a route table lists it: where its traffic goes now."""

    project: Name
    model: Name
    version: VersionId
    protocol: Protocol = "HTTP_JSON"
    replicas: list[str] = Field(
        default_factory=list, description="Ready replicas as host:port; empty means none ready."
    )
    scale_to_zero: bool = Field(
        default=False,
        description="The version may be scaled to zero: with no replicas, gateways hold its "
        "requests while one starts instead of answering 503.",
    )
    container_concurrency: int = Field(
        default=0, ge=0, le=1000,
        description="Requests one replica serves at once; past it, gateways queue them. "
        "0: no limit.",
    )  # fmt: skip

    @field_validator("replicas")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            parse_address(address)
        if len(set(value)) != len(value):
            raise ValueError("replicas: an address appears more than once")
        return value

    @property
    def full_name(self) -> str:
        return full_name(self.model, self.version)


class RouteTableSpec(StrictModel):
    revision: int = Field(default=0, ge=0)
    version_endpoints: list[RouteTableVersionEndpoint] = Field(default_factory=list)
    model_endpoints: list[ModelEndpointSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> RouteTableSpec:
        versions: dict[tuple[str, str, str], RouteTableVersionEndpoint] = {}
        for i, ve in enumerate(self.version_endpoints):
            key = (ve.project, ve.model, ve.version)
            if key in versions:
                raise ValueError(
                    f"version_endpoints.{i}: {ve.project}/{ve.model}/{ve.version} is listed twice"
                )
            versions[key] = ve
        models: set[tuple[str, str]] = set()
        for i, me in enumerate(self.model_endpoints):
            if (me.project, me.model) in models:
                raise ValueError(f"model_endpoints.{i}: {me.project}/{me.model} is listed twice")
            models.add((me.project, me.model))
            for field_path, name in me.rule.named_versions():
                found = versions.get((me.project, me.model, name))
                where = f"model_endpoints.{i}.rule.{field_path}"
                if found is None:
                    raise ValueError(f"{where}: no version endpoint {me.project}/{me.model}/{name}")
                if found.protocol != me.protocol:
                    raise ValueError(
                        f"{where}: version {name} speaks {found.protocol}, "
                        f"the model endpoint {me.protocol}"
                    )
        return self


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) to a (host, port) pair, with a clear error."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"replica address {address!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"replica address {address!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def load_route_file(path: Path) -> RouteTableSpec:
    """Read and validate a YAML or JSON route file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RouteFileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise RouteFileError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    try:
        return RouteTableSpec.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise RouteFileError(f"{path}: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the field path and the reason."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
