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


class WhoAmI(StrictModel):
    """The caller, as the controller's tokens name it (anonymous, write, every project and
    host when the controller has no tokens)."""

    name: str
    access: Literal["read", "write"]
    projects: list[str] = Field(description="Projects it may access; '*' is every one.")
    host: bool = Field(description="May deploy what runs code of its choosing on the host.")


# --- the short time series (controller/timeseries.py) --------------------------------


class SeriesPoint(StrictModel):
    """One version's closed second, as the gateways reported it, with its replicas."""

    second: int = Field(description="Unix time, whole seconds.")
    requests: int = Field(description="Requests that arrived within the second.")
    answered: int = Field(description="Answers callers got (any status).")
    errors: int = Field(description="Of those, server errors (5xx, or a gRPC server fault).")
    p50_ms: float | None = Field(description="Median latency of those answers; null: none.")
    p99_ms: float | None = Field(description="99th percentile latency; null: none.")
    shadow_compared: int = Field(description="Mirrored copies compared with the primary.")
    shadow_differed: int = Field(description="Of those, status or body differed.")
    ready: int = Field(description="Ready replicas at the end of the second.")
    desired: int | None = Field(description="The autoscaler's last decision; null: none.")


class VersionSeries(StrictModel):
    version: str
    points: list[SeriesPoint] = Field(description="One per second, oldest first.")


class ScaleEvent(StrictModel):
    """A change of a version's replica count the autoscaler decided, and why."""

    at: float = Field(description="Unix time.")
    version: str
    from_replicas: int
    to_replicas: int
    reason: str = Field(description="The policy's reason (rps, concurrency, idle, forecast, ...).")
    cold_start: bool = Field(description="From zero, with requests waiting for it.")


class ModelSeries(StrictModel):
    """A model's last minutes, per version and second (GET .../series)."""

    project: str
    model: str
    window_seconds: int = Field(description="How far back the controller keeps seconds.")
    until: int = Field(description="The newest closed second included (unix).")
    signals: bool = Field(
        description="false: this controller reads no gateway signals; request fields are 0."
    )
    versions: list[VersionSeries]
    events: list[ScaleEvent] = Field(description="Oldest first.")


class VersionSummary(StrictModel):
    """A version at a glance, over the overview's last seconds."""

    version: str
    status: VersionStatus
    message: str
    ready_replicas: int
    desired_replicas: int | None = Field(description="The autoscaler's; null: none attached.")
    weight: int = Field(description="Its share of the rule's destinations, percent.")
    mirrored_percent: float = Field(description="Share of requests copied to it; 0: not mirrored.")
    rps: float = Field(description="Requests per second.")
    error_rate: float | None = Field(description="Server errors per answer; null: no answers.")
    p50_ms: float | None
    p99_ms: float | None
    shadow_agreement: float | None = Field(
        description="Mirrored copies whose answer matched the primary's, per copy compared; "
        "null: none compared."
    )


class ModelSummary(StrictModel):
    project: str
    model: str
    protocol: str
    url: str = Field(description="The model endpoint's URL; empty before it has one.")
    revision: int | None = Field(description="The rule's revision; null: no model endpoint.")
    rule: Rule | None
    rollout_phase: str | None = Field(description="The rollout's phase; null: none ever.")
    versions: list[VersionSummary]


class Overview(StrictModel):
    """Every model with an endpoint or a version, as GET /v1/overview returns them."""

    window_seconds: int = Field(description="Rates are over this many closed seconds.")
    models: list[ModelSummary]
