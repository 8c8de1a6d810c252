"""Every SDK operation, once, free of I/O: what to ask the API and what its answer means.

Each operation is a generator (a :data:`Flow`): it yields a :class:`Call` (an HTTP request
to send) or a :class:`Pause` (time to wait), is sent back the :class:`Reply` (or
``None`` after a pause), and returns the result. :class:`~merlin_dp.sdk.client.Client`
runs flows with blocking sockets and :class:`~merlin_dp.sdk.client.AsyncClient` with
asyncio, so the two can't disagree on paths, bodies, waiting or errors. Bodies and
results are the API's own pydantic models (``merlin_dp.controller.models``,
``merlin_dp.spec``), validated both ways.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ValidationError

from merlin_dp.controller.models import (
    AuditEntry,
    AuditLog,
    EndpointDeleted,
    ModelEndpoint,
    ModelEndpointBody,
    ModelSeries,
    Overview,
    RollbackBody,
    RuleHistory,
    RuleRevision,
    SwitchBody,
    VersionEndpoint,
    VersionEndpointList,
    VersionLogs,
    WhoAmI,
)
from merlin_dp.sdk.errors import (
    DeployFailed,
    FieldProblem,
    Invalid,
    MerlinError,
    NoSuchModel,
    NotFound,
    PredictionFailed,
    WaitTimeout,
    api_error,
)
from merlin_dp.sdk.packaging import package
from merlin_dp.sdk.text import status_text
from merlin_dp.servers.package import MANIFEST, Manifest, PackageError
from merlin_dp.spec.endpoints import (
    AutoscalingPolicy,
    ResourceRequest,
    VersionEndpointSpec,
)
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.routes import RouteTableSpec, RouteTableVersionEndpoint
from merlin_dp.spec.rule import Destination, HeaderMatch, Mirror, Protocol, Rule, Sticky

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

API_TIMEOUT = 30.0
POLL_SECONDS = 0.5
LOG_LINES_ON_FAILURE = 20


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = API_TIMEOUT


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Pause:
    seconds: float


Flow = Generator[Call | Pause, Reply | None, T]


@dataclass(frozen=True)
class Prediction:
    """A model's answer through the gateway."""

    result: Any  # the parsed JSON body
    version: str  # the version that served it (X-Model-Version)
    request_id: str
    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True)
class ModelStatus:
    """A model at a glance: its endpoint (None before the first route), its version
    endpoints, and its rollout (running, or the last that ended; None if never)."""

    name: str
    endpoint: ModelEndpoint | None
    versions: list[VersionEndpoint]
    rollout: RolloutStatus | None

    def __str__(self) -> str:
        return status_text(self.name, self.endpoint, self.versions, self.rollout)


@dataclass(frozen=True)
class RouteChange:
    """What a model's traffic looks like after a change: its rule (None once its
    endpoint is gone) and its versions with their ready replicas, as gateways route."""

    revision: int
    endpoint: Any  # ModelEndpointSpec | None
    versions: list[RouteTableVersionEndpoint]


def split_name(text: str, parts: int) -> list[str]:
    names = text.split("/")
    if len(names) != parts or not all(names):
        shape = "PROJECT/MODEL/VERSION" if parts == 3 else "PROJECT/MODEL"
        raise ValueError(f"{text!r} is not {shape}")
    return names


class Operations:
    """The flows, bound to one controller, token and (optionally) gateway."""

    def __init__(self, controller: str, token: str | None, gateway: str | None) -> None:
        self.controller = controller.rstrip("/")
        self.token = token
        self.gateway = gateway.rstrip("/") if gateway else None

    # --- plumbing ---------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: BaseModel | dict[str, Any] | None = None,
        *,
        if_match: int | None = None,
        timeout: float | None = API_TIMEOUT,
    ) -> Call:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = (body.model_dump_json(exclude_unset=True).encode()
                    if isinstance(body, BaseModel) else json.dumps(body).encode())  # fmt: skip
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if if_match is not None:
            headers["If-Match"] = f'"{if_match}"'
        return Call(method, self.controller + path, data, headers, timeout)

    def api(
        self,
        method: str,
        path: str,
        answer: type[M],
        body: BaseModel | dict[str, Any] | None = None,
        *,
        if_match: int | None = None,
    ) -> Flow[M]:
        reply = yield self.call(method, path, body, if_match=if_match)
        assert reply is not None
        if reply.status >= 400:
            raise api_error(reply.status, reply.json())
        try:
            return answer.model_validate_json(reply.body)
        except ValidationError as exc:
            raise MerlinError(
                f"{method} {path}: the controller's answer is not a {answer.__name__}: {exc}"
            ) from None

    @staticmethod
    def model_path(name: str) -> str:
        project, model = split_name(name, 2)
        return f"/v1/projects/{quote(project)}/models/{quote(model)}"

    @staticmethod
    def version_path(name: str) -> str:
        project, model, version = split_name(name, 3)
        return f"/v1/projects/{quote(project)}/models/{quote(model)}/versions/{quote(version)}"

    # --- version endpoints ------------------------------------------------------------

    def deploy(
        self, name: str, spec: VersionEndpointSpec, *, wait: float | None, if_match: int | None
    ) -> Flow[VersionEndpoint]:
        path = self.version_path(name) + "/endpoint"
        version = yield from self.api("PUT", path, VersionEndpoint, spec, if_match=if_match)
        if not wait:
            return version
        return (yield from self.wait(name, wait, first=version))

    def wait(
        self, name: str, timeout: float, *, first: VersionEndpoint | None = None
    ) -> Flow[VersionEndpoint]:
        """Until the version endpoint runs: its record, or DeployFailed with the reason
        and its replicas' last log lines, or WaitTimeout."""
        waited = 0.0
        version = first
        while True:
            if version is None:
                version = yield from self.get_version(name)
            if version.status in ("running", "serving"):
                return version
            if version.status in ("failed", "terminated"):
                lines = yield from self._last_lines(name)
                raise DeployFailed(name, version.message or version.status, lines, version)
            if waited >= timeout:
                raise WaitTimeout(name, timeout, version)
            yield Pause(POLL_SECONDS)
            waited += POLL_SECONDS
            version = None

    def _last_lines(self, name: str) -> Flow[list[str]]:
        try:
            logs = yield from self.logs(name, LOG_LINES_ON_FAILURE)
        except MerlinError:  # Kubernetes mode keeps no logs here; the message is enough
            return []
        return [line for entry in logs.logs[-1:] for line in entry.lines]

    def get_version(self, name: str) -> Flow[VersionEndpoint]:
        return (yield from self.api("GET", self.version_path(name) + "/endpoint", VersionEndpoint))

    def undeploy(self, name: str, if_match: int | None = None) -> Flow[VersionEndpoint]:
        path = self.version_path(name) + "/endpoint"
        return (yield from self.api("DELETE", path, VersionEndpoint, if_match=if_match))

    def versions(self, model: str) -> Flow[list[VersionEndpoint]]:
        path = self.model_path(model) + "/versions"
        found = yield from self.api("GET", path, VersionEndpointList)
        return sorted(found.versions, key=lambda v: v.version)

    def logs(self, name: str, lines: int = 50) -> Flow[VersionLogs]:
        path = self.version_path(name) + f"/logs?lines={int(lines)}"
        return (yield from self.api("GET", path, VersionLogs))

    def follow_logs(self, name: str, lines: int) -> Call:
        path = self.version_path(name) + f"/logs?lines={int(lines)}&follow=1"
        return self.call("GET", path, timeout=None)

    # --- model endpoints --------------------------------------------------------------

    def endpoint(self, model: str) -> Flow[ModelEndpoint]:
        return (yield from self.api("GET", self.model_path(model) + "/endpoint", ModelEndpoint))

    def endpoint_or_none(self, model: str) -> Flow[ModelEndpoint | None]:
        try:
            return (yield from self.endpoint(model))
        except NotFound:
            return None

    def set_rule(
        self, model: str, rule: Rule, protocol: Protocol | None, if_match: int | None
    ) -> Flow[ModelEndpoint]:
        if protocol is None:  # keep the endpoint's own; a new one is HTTP_JSON
            current = yield from self.endpoint_or_none(model)
            protocol = current.protocol if current else "HTTP_JSON"
        body = ModelEndpointBody(rule=rule, protocol=protocol)
        path = self.model_path(model) + "/endpoint"
        return (yield from self.api("PUT", path, ModelEndpoint, body, if_match=if_match))

    def edit_rule(self, model: str, **changes: Any) -> Flow[ModelEndpoint]:
        """Read the rule, change some of its fields, write it back with If-Match: a change
        someone made in between raises StaleRevision instead of being overwritten."""
        current = yield from self.endpoint(model)
        data = current.rule.model_dump(exclude_unset=True)
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        rule = build(Rule, data, "rule")
        return (yield from self.set_rule(model, rule, current.protocol, current.revision))

    def delete_endpoint(self, model: str, if_match: int | None = None) -> Flow[EndpointDeleted]:
        path = self.model_path(model) + "/endpoint"
        return (yield from self.api("DELETE", path, EndpointDeleted, if_match=if_match))

    def switch(self, model: str, to: str | None, if_match: int | None) -> Flow[ModelEndpoint]:
        path = self.model_path(model) + "/endpoint:switch"
        body = SwitchBody(to_version=to) if to is not None else SwitchBody()
        return (yield from self.api("POST", path, ModelEndpoint, body, if_match=if_match))

    def rollback(
        self, model: str, to_revision: int | None, if_match: int | None
    ) -> Flow[ModelEndpoint]:
        path = self.model_path(model) + "/endpoint:rollback"
        body = RollbackBody(to_revision=to_revision) if to_revision is not None else RollbackBody()
        return (yield from self.api("POST", path, ModelEndpoint, body, if_match=if_match))

    def history(self, model: str) -> Flow[list[RuleRevision]]:
        path = self.model_path(model) + "/endpoint/history"
        return (yield from self.api("GET", path, RuleHistory)).history

    def status(self, model: str) -> Flow[ModelStatus]:
        versions = yield from self.versions(model)
        endpoint = yield from self.endpoint_or_none(model)
        rollout = yield from self.rollout_or_none(model)
        if endpoint is None and not versions:
            raise NoSuchModel(model)
        return ModelStatus(model, endpoint, versions, rollout)

    def whoami(self) -> Flow[WhoAmI]:
        return (yield from self.api("GET", "/v1/whoami", WhoAmI))

    def overview(self) -> Flow[Overview]:
        return (yield from self.api("GET", "/v1/overview", Overview))

    def series(self, model: str, since: int) -> Flow[ModelSeries]:
        path = self.model_path(model) + f"/series?since={int(since)}"
        return (yield from self.api("GET", path, ModelSeries))

    def watch_series(self, model: str, since: int) -> Call:
        return self.call("GET", self.model_path(model) + f"/series?since={int(since)}&watch=1",
                         timeout=None)  # fmt: skip

    def audit(self, limit: int) -> Flow[list[AuditEntry]]:
        return (yield from self.api("GET", f"/v1/audit?limit={int(limit)}", AuditLog)).entries

    # --- rollouts ---------------------------------------------------------------------

    def start_rollout(
        self, model: str, plan: RolloutPlan, if_match: int | None
    ) -> Flow[RolloutStatus]:
        path = self.model_path(model) + "/endpoint:rollout"
        return (yield from self.api("POST", path, RolloutStatus, plan, if_match=if_match))

    def rollout(self, model: str) -> Flow[RolloutStatus]:
        path = self.model_path(model) + "/endpoint/rollout"
        return (yield from self.api("GET", path, RolloutStatus))

    def rollout_or_none(self, model: str) -> Flow[RolloutStatus | None]:
        try:
            return (yield from self.rollout(model))
        except NotFound:
            return None

    def steer_rollout(self, model: str, action: str) -> Flow[RolloutStatus]:
        path = self.model_path(model) + f"/endpoint/rollout:{action}"
        return (yield from self.api("POST", path, RolloutStatus))

    # --- the gateway ------------------------------------------------------------------

    def predict(
        self,
        model: str,
        payload: Any,
        *,
        version: str | None,
        path: str,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> Flow[Prediction]:
        base = yield from self.gateway_base(model, version)
        send = {"Content-Type": "application/json", **(headers or {})}
        body = json.dumps(payload, default=_array).encode()
        reply = yield Call("POST", base + "/" + path.lstrip("/"), body,
                           send, timeout)  # fmt: skip
        assert reply is not None
        served = reply.headers.get("x-model-version", "")
        if reply.status >= 400:
            raise PredictionFailed(reply.status, reply.json(), served)
        return Prediction(reply.json(), served, reply.headers.get("x-request-id", ""),
                          reply.status, reply.headers)  # fmt: skip

    def gateway_base(self, model: str, version: str | None) -> Flow[str]:
        """Where a model (or one version) is reached. Hosts under ``localhost`` don't
        resolve for most libraries, so for them (and for a gateway given explicitly) the
        path form on the gateway's address; otherwise the model's own URL."""
        project, name = split_name(model, 2)
        target = f"{name}-{version}" if version else name
        if self.gateway:
            return f"{self.gateway}/serving/{project}/{target}"
        if version:
            record = yield from self.get_version(f"{model}/{version}")
            url = record.url
        else:
            url = (yield from self.endpoint(model)).url
        parts = urlsplit(url)
        if not parts.scheme or not parts.hostname:
            raise MerlinError(f"{model} has no HTTP URL ({url!r}): is it a UPI_V1 endpoint?")
        host = parts.hostname
        if host == "localhost" or host.endswith(".localhost"):
            port = f":{parts.port}" if parts.port else ""
            return f"http://127.0.0.1{port}/serving/{project}/{target}"
        return url.rstrip("/")

    def watch(self) -> Call:
        return self.call("GET", "/v1/routes?watch=1", timeout=None)


def _array(value: Any) -> Any:
    """numpy arrays and scalars (anything with ``tolist``) as JSON lists and numbers, so a
    notebook can send ``{"instances": X[:3]}`` as it is."""
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON: send lists, numbers and strings")


def route_change(line: bytes, model: str, last: RouteChange | None) -> RouteChange | None:
    """One line of the route table stream, as a change to ``model``'s traffic (None when
    the line is a heartbeat or leaves the model as it was)."""
    if not line.strip():
        return None
    table = RouteTableSpec.model_validate_json(line)
    project, name = split_name(model, 2)
    endpoint = next(
        (m for m in table.model_endpoints if (m.project, m.model) == (project, name)), None
    )
    versions = [v for v in table.version_endpoints if (v.project, v.model) == (project, name)]
    change = RouteChange(table.revision, endpoint, versions)
    if last is not None and (last.endpoint, last.versions) == (endpoint, versions):
        return None
    return change


# --- building bodies from friendly arguments ---------------------------------------------


def build(model: type[M], data: Any, where: str) -> M:
    """``data`` (the model itself, or a dict of its fields) as ``model``; a validation
    error raises Invalid with field paths, before anything is sent."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [
            (f"{where}." if where else "") + ".".join(str(p) for p in e["loc"])
            for e in exc.errors()
        ]
        problems = [
            FieldProblem(path.rstrip("."), e["msg"].removeprefix("Value error, "))
            for path, e in zip(fields, exc.errors(), strict=True)
        ]
        summary = "; ".join(f"{p.path}: {p.message}" for p in problems)
        raise Invalid(422, "invalid", summary, problems) from None


def weights_rule(
    weights: Mapping[str, int] | Sequence[Destination],
    *,
    match: Sequence[HeaderMatch | dict[str, Any]] = (),
    sticky: Sticky | dict[str, Any] | None = None,
    mirror: Mirror | dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Rule:
    destinations: list[Any] = (
        [{"version": str(v), "weight": w} for v, w in weights.items()]
        if isinstance(weights, Mapping) else list(weights)
    )  # fmt: skip
    data: dict[str, Any] = {"destinations": destinations, "match": list(match)}
    if sticky is not None:
        data["sticky"] = sticky
    if mirror is not None:
        data["mirror"] = mirror
    if timeout is not None:
        data["timeout_seconds"] = timeout
    return build(Rule, data, "rule")


def weights_change(weights: Mapping[str, int] | Sequence[Destination]) -> dict[str, Any]:
    return {"destinations": weights_rule(weights).destinations}


def mirror_change(
    version: str | None, percent: float, options: Mapping[str, Any]
) -> dict[str, Any]:
    return {"mirror": None if version is None else {"version": version, "percent": percent,
                                                    **options}}  # fmt: skip


def sticky_change(header: str | None, cookie: str | None) -> dict[str, Any]:
    if header is None and cookie is None:
        return {"sticky": None}
    return {"sticky": {k: v for k, v in (("header", header), ("cookie", cookie)) if v is not None}}


def deploy_body(
    model: Any,
    *,
    model_dir: str | Path | None,
    pyfunc_class: str | None,
    command: Sequence[str] | None,
    workdir: str | Path | None,
    artifacts: Mapping[str, str | Path] | None,
    requirements: Sequence[str],
    package_dir: str | Path | None,
    protocol: Protocol,
    resources: ResourceRequest | dict[str, Any] | None,
    autoscaling: AutoscalingPolicy | dict[str, Any] | None,
    env: Mapping[str, str] | None,
    container_concurrency: int | None,
    ready_deadline: float | None,
    spec: VersionEndpointSpec | dict[str, Any] | None,
) -> VersionEndpointSpec:
    """The deploy body for what ``Client.deploy`` was given: a whole ``spec``; a model
    object, packaged here first (it deploys as its directory); a model directory; or a
    command."""
    if spec is not None:
        if model is not None or model_dir is not None or command is not None:
            raise ValueError("give spec= alone, or the model, model_dir= or command=")
        return build(VersionEndpointSpec, spec, "")
    model_type = None
    if model is not None:
        if model_dir is not None or command is not None:
            raise ValueError("give one of: a model object, model_dir= or command=")
        packaged = package(model, package_dir, artifacts=artifacts, requirements=requirements)
        model_dir, model_type, pyfunc_class = packaged.path, packaged.kind, None
    elif artifacts or requirements:
        raise ValueError("artifacts= and requirements= are for a model object")
    data: dict[str, Any] = {"protocol": protocol}
    if command is not None:
        if model_dir is not None:
            raise ValueError("give a command or a model (directory), not both")
        data.update(type="custom", command=list(command),
                    workdir=str(Path(workdir or ".").resolve()))  # fmt: skip
    elif model_dir is not None:
        if workdir is not None:
            raise ValueError("workdir is for a command; a model directory is read as is")
        data.update(type=model_type or _dir_type(Path(model_dir), pyfunc_class),
                    model_dir=str(Path(model_dir).resolve()))  # fmt: skip
        if pyfunc_class:
            data["pyfunc_class"] = pyfunc_class
    else:
        raise ValueError("give a model (an object, a class or an estimator), model_dir= or "
                         "command=")  # fmt: skip
    optional = {"resource_request": resources, "autoscaling_policy": autoscaling,
                "env_vars": dict(env) if env else None,
                "container_concurrency": container_concurrency,
                "ready_deadline_seconds": ready_deadline}  # fmt: skip
    data.update({k: v for k, v in optional.items() if v is not None})
    return build(VersionEndpointSpec, data, "")


def _dir_type(model_dir: Path, pyfunc_class: str | None) -> str:
    """A class named: pyfunc. A package (its manifest says): its kind. Else sklearn."""
    if pyfunc_class:
        return "pyfunc"
    if (model_dir / MANIFEST).exists():
        try:
            return Manifest.read(model_dir).kind
        except PackageError as exc:
            raise ValueError(str(exc)) from None
    return "sklearn"
