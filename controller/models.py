"""The controller's data at its edges: API bodies and the persisted state document.

Everything a user sends is validated here (pydantic, unknown fields refused); the same
models are what the store persists and what ``/openapi.json`` is generated from.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from gateway.rule import Name, Protocol, Rule, StrictModel, VersionId

MetricsType = Literal["cpu_utilization", "memory_utilization", "rps", "concurrency"]
VersionStatus = Literal["pending", "running", "serving", "failed", "terminated"]
ModelType = Literal["custom", "pyfunc", "sklearn", "kubernetes"]

CPU = r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$"
MEMORY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ResourceRequest(StrictModel):
    min_replica: int = Field(default=1, ge=0, le=100)
    max_replica: int = Field(default=2, ge=1, le=100)
    cpu_request: Annotated[str, StringConstraints(pattern=CPU)] = "500m"
    memory_request: Annotated[str, StringConstraints(pattern=MEMORY)] = "512Mi"

    @model_validator(mode="after")
    def _bounds(self) -> ResourceRequest:
        if self.min_replica > self.max_replica:
            raise ValueError(
                f"min_replica ({self.min_replica}) is above max_replica ({self.max_replica})"
            )
        return self


class AutoscalingPolicy(StrictModel):
    """Merlin's policy. Utilization targets are percent of the request (1-100); rps and
    concurrency targets are per replica."""

    metrics_type: MetricsType = "concurrency"
    target_value: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> AutoscalingPolicy:
        if self.metrics_type.endswith("_utilization") and self.target_value > 100:
            raise ValueError(f"{self.metrics_type} target_value is a percentage (1-100)")
        return self


class VersionEndpointSpec(StrictModel):
    """How to run one version endpoint (the body of PUT .../versions/{v}/endpoint)."""

    type: ModelType = Field(
        default="custom",
        description="custom, pyfunc or sklearn. kubernetes: a Deployment and Service found "
        "in the cluster (Kubernetes mode); shown, never accepted by the API.",
    )
    command: list[str] = Field(
        default_factory=list, description="custom: the program and its arguments."
    )
    model_dir: str = Field(default="", description="pyfunc / sklearn: the artifact directory.")
    pyfunc_class: str = Field(default="", description="pyfunc: 'module:Class' in model_dir.")
    protocol: Protocol = "HTTP_JSON"
    resource_request: ResourceRequest = Field(default_factory=ResourceRequest)
    autoscaling_policy: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)
    env_vars: dict[str, str] = Field(default_factory=dict)
    ready_deadline_seconds: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name.startswith("CARAML_") or name == "STORAGE_URI":
                raise ValueError(f"{name} is set by the platform (replica contract)")
        return value

    @model_validator(mode="after")
    def _runnable(self) -> VersionEndpointSpec:
        if self.type == "custom" and not self.command:
            raise ValueError("type custom needs a command")
        if self.type in ("pyfunc", "sklearn") and not self.model_dir:
            raise ValueError(f"type {self.type} needs model_dir")
        if self.type == "pyfunc" and ":" not in self.pyfunc_class:
            raise ValueError("type pyfunc needs pyfunc_class as 'module:Class'")
        if self.type == "sklearn" and self.protocol == "UPI_V1":
            raise ValueError("type sklearn serves HTTP_JSON; for UPI_V1 wrap it as pyfunc")
        return self


class StateModel(StrictModel):
    """Persisted records: changed only on a deep copy inside a state transition."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class VersionEndpoint(StateModel):
    """A version endpoint as stored and as GET returns it."""

    project: str
    model: str
    version: VersionId
    spec: VersionEndpointSpec
    status: VersionStatus = "pending"
    message: str = ""
    replicas: list[str] = Field(default_factory=list, description="Ready replicas, host:port.")
    generation: int = 1
    url: str = ""


class ModelEndpointBody(StrictModel):
    """The body of PUT .../endpoint."""

    rule: Rule
    protocol: Protocol = "HTTP_JSON"


class RuleRevision(StrictModel):
    revision: int
    rule: Rule
    at: float
    by: str


class ModelEndpoint(StateModel):
    project: str
    model: str
    protocol: Protocol
    rule: Rule
    revision: int = Field(description="The rule's revision; send it back as If-Match.")
    url: str = ""


class SwitchBody(StrictModel):
    to_version: VersionId | None = Field(
        default=None, description="Defaults to the one other running version."
    )


class ActivationBody(StrictModel):
    """A gateway holds requests for a version endpoint that has no replica (scaled to zero)."""

    project: Name
    model: Name
    version: VersionId
    waiting: int = Field(default=1, ge=0, le=1_000_000, description="Requests held now.")


class RollbackBody(StrictModel):
    to_revision: int | None = Field(default=None, description="Defaults to the previous rule.")


class ControllerState(StateModel):
    """The whole persisted state; each accepted change makes a new revision."""

    revision: int = 0
    versions: dict[str, VersionEndpoint] = Field(default_factory=dict)  # "p/m/v"
    endpoints: dict[str, ModelEndpoint] = Field(default_factory=dict)  # "p/m"
    history: dict[str, list[RuleRevision]] = Field(default_factory=dict)  # "p/m"


class ErrorBody(StrictModel):
    code: str
    message: str
    fields: list[dict[str, str]] = Field(default_factory=list)


class ErrorResponse(StrictModel):
    error: ErrorBody
