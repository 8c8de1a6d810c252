"""The controller's data at its edges: API bodies and the persisted state document.

Everything a user sends is validated here (pydantic, unknown fields refused); the same
models are what the store persists and what ``/openapi.json`` is generated from.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from merlin_dp.spec.rule import Name, Protocol, Rule, StrictModel, VersionId

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
    ready_deadline_seconds: float = Field(
        default=120.0, gt=0, le=3600,
        description="Fails the version if no replica is ready by then (a crash loop fails "
        "it sooner).",
    )  # fmt: skip
    workdir: str = Field(
        default="", max_length=4096,
        description="custom: the absolute directory the command runs in, so relative paths "
        "in it mean what they meant where it was deployed from (merlin-dp deploy sends the "
        "caller's current directory). Empty: the controller's working directory.",
    )  # fmt: skip

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
        if self.workdir and self.type != "custom":
            raise ValueError(f"workdir is for type custom; type {self.type} reads model_dir")
        if self.workdir and not self.workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, not {self.workdir!r}")
        return self


class StateModel(StrictModel):
    """Persisted records: changed only on a deep copy inside a state transition."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


URL_DESCRIPTION = (
    "Where clients reach it through the gateway (filled in answers, not stored): "
    "http://<name>.<project>.<domain>:<port> for HTTP_JSON; for UPI_V1 the gRPC target "
    "<name>.<project>.<domain>:<port>, whose host is the :authority the gateway routes by. "
    "Empty for UPI_V1 when no gateway serves gRPC."
)


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
    url: str = Field(default="", description=URL_DESCRIPTION)


class ReplicaLog(StrictModel):
    name: str = Field(description="The log file's name; one file per replica slot.")
    lines: list[str] = Field(description="Its last lines, oldest first.")


class VersionLogs(StrictModel):
    """A version endpoint's replica logs (local runtime), as GET .../logs returns them."""

    logs: list[ReplicaLog] = Field(description="Oldest file first.")
    omitted: int = Field(default=0, description="Older files left out.")


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
    url: str = Field(default="", description=URL_DESCRIPTION)


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


# --- answers: what the API returns (the handlers build them, so the document can't drift) ---


class FieldError(StrictModel):
    path: str = Field(
        description="Where: a body field path (rule.destinations.0.weight), "
        "a path or query parameter's name, or (body) for the body as a whole."
    )
    message: str


class ErrorBody(StrictModel):
    code: str = Field(
        description="Machine-readable: invalid, not_found, conflict, "
        "stale_revision, unauthorized, forbidden, method_not_allowed, ..."
    )
    message: str = Field(description="For people: what was wrong and, where it helps, what to do.")
    fields: list[FieldError] = Field(default_factory=list)


class ErrorResponse(StrictModel):
    """Every error answer (4xx, 5xx) has this body."""

    error: ErrorBody


class VersionEndpointList(StrictModel):
    versions: list[VersionEndpoint]


class RuleHistory(StrictModel):
    history: list[RuleRevision] = Field(description="Oldest first; at most the last 100.")


class EndpointDeleted(StrictModel):
    deleted: str = Field(description="project/model")
    revision: int = Field(description="The state revision that removed it.")


class ActivationAccepted(StrictModel):
    accepted: str = Field(description="project/model/version")
    waiting: int


class AuditEntry(BaseModel):
    """One accepted change. Entries are returned as stored, so newer ones may carry more
    fields than listed here."""

    model_config = ConfigDict(extra="allow")

    at: float = Field(description="Unix time.")
    revision: int
    who: str = Field(description="The token's name (anonymous without tokens; runtime).")
    action: str = Field(
        description="deploy, undeploy, set_endpoint, delete_endpoint, switch, rollback, failed, ..."
    )
    target: str = Field(description="project/model or project/model/version")
    rule: Rule | None = Field(default=None, description="set_endpoint: the rule sent.")


class AuditLog(StrictModel):
    entries: list[AuditEntry] = Field(description="Oldest first.")


class Health(StrictModel):
    status: Literal["ok"]
    revision: int = Field(description="The controller's current state revision.")


class Readiness(StrictModel):
    ready: bool
    reason: str
    revision: int
