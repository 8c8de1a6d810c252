"""The controller's data at its edges: API bodies and the persisted state document.

Everything a user sends is validated here (pydantic, unknown fields refused); the same
models are what the store persists and what ``/openapi.json`` is generated from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from merlin_dp.spec.endpoints import VersionEndpointSpec
from merlin_dp.spec.rollout import RolloutStatus
from merlin_dp.spec.rule import Name, Protocol, Rule, StrictModel, VersionId

VersionStatus = Literal["pending", "running", "serving", "failed", "terminated"]


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
    # Each model endpoint's rollout, running or the last that ended ("p/m").
    rollouts: dict[str, RolloutStatus] = Field(default_factory=dict)


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
