"""What the cluster says, as controller state: a pure function of the objects seen.

:func:`derive` takes the ModelEndpoints and EndpointSlices an informer holds, and the
previous :class:`~merlin_dp.controller.models.ControllerState`, and returns the new state (the same
object when nothing changed, so no revision is spent) plus the status each ModelEndpoint
should carry. Rules are validated with the API's own :class:`~merlin_dp.spec.rule.Rule` and
cross-checks; a refused ModelEndpoint gets ``Ready=False`` with a reason and message, and
keeps serving its last good rule if it had one (as Knative keeps the last good revision).

Versions come from EndpointSlices: a slice labelled with project, model and version is
a version endpoint; its ready, non-terminating endpoints are the replicas, at the port
named ``http`` (HTTP_JSON) or ``grpc`` (UPI_V1, which also names the protocol).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from merlin_dp.controller.kubernetes.objects import (
    MAX_REPLICAS_LABEL,
    METRIC_LABEL,
    MIN_REPLICAS_LABEL,
    MODEL_LABEL,
    PROJECT_LABEL,
    SERVICE_NAME_LABEL,
    TARGET_LABEL,
    VERSION_LABEL,
)
from merlin_dp.controller.models import (
    ControllerState,
    ModelEndpoint,
    RuleRevision,
    VersionEndpoint,
)
from merlin_dp.controller.state import HISTORY_LIMIT, model_key, version_key
from merlin_dp.spec.endpoints import (
    AutoscalingPolicy,
    ModelEndpointSpec,
    ResourceRequest,
    VersionEndpointSpec,
)
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.routes import describe_validation_error
from merlin_dp.spec.rule import Protocol

log = logging.getLogger("merlin_dp.controller.kubernetes")

Obj = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Replica:
    address: str  # host:port of traffic
    metrics_address: str  # host:port of /metrics (the http port)
    state: str  # ready | starting | draining
    pod: str


@dataclass(frozen=True, slots=True)
class Version:
    """One version endpoint as its EndpointSlices describe it."""

    project: str
    model: str
    version: str
    service: str
    protocol: Protocol
    replicas: tuple[Replica, ...]
    resource_request: ResourceRequest
    autoscaling: AutoscalingPolicy
    problems: tuple[str, ...] = ()
    # False when no slice has ports (no pod yet, or scaled to zero): the protocol is then
    # whatever the model endpoint routing it says.
    protocol_known: bool = True

    @property
    def key(self) -> str:
        return version_key(self.project, self.model, self.version)

    @property
    def ready(self) -> list[str]:
        return sorted(r.address for r in self.replicas if r.state == "ready")


@dataclass(frozen=True, slots=True)
class Condition:
    status: str  # "True" | "False"
    reason: str
    message: str


@dataclass
class Derived:
    state: ControllerState
    conditions: dict[str, Condition] = field(default_factory=dict)  # ME name -> Ready
    keys: dict[str, str] = field(default_factory=dict)  # ME name -> "project/model" it names
    owners: dict[str, str] = field(default_factory=dict)  # "project/model" -> ME name
    versions: dict[str, Version] = field(default_factory=dict)  # from the slices
    # spec.rollout: the plan each owning ModelEndpoint declares, or why it is refused.
    plans: dict[str, RolloutPlan] = field(default_factory=dict)  # "project/model" -> plan
    plan_errors: dict[str, str] = field(default_factory=dict)  # ME name -> message


# --- versions from EndpointSlices ------------------------------------------------------


def versions_from_slices(slices: Iterable[Obj]) -> dict[str, Version]:
    grouped: dict[tuple[str, str, str], list[Obj]] = {}
    for s in slices:
        labels = (s.get("metadata") or {}).get("labels") or {}
        try:
            ident = (labels[PROJECT_LABEL], labels[MODEL_LABEL], labels[VERSION_LABEL])
        except KeyError:
            continue
        grouped.setdefault(ident, []).append(s)
    found: dict[str, Version] = {}
    for (project, model, version), group in sorted(grouped.items()):
        v = _version(project, model, version, group)
        found[v.key] = v
    return found


def one_address_family(slices: Iterable[Obj]) -> list[Obj]:
    """A dual-stack Service has an IPv4 and an IPv6 slice for the same pods: read one
    family (IPv4 when there is any), so each pod counts once. FQDN slices are skipped."""
    usable = [s for s in slices if s.get("addressType", "IPv4") in ("IPv4", "IPv6")]
    v4 = [s for s in usable if s.get("addressType", "IPv4") == "IPv4"]
    return v4 or usable


def _port(slice_: Obj, name: str) -> int | None:
    for p in slice_.get("ports") or []:
        if p.get("name") == name and isinstance(p.get("port"), int):
            return int(p["port"])
    return None


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


# When one endpoint is in several slices (during a slice's replacement), the most
# useful state wins, as kube-proxy does: ready over starting over draining.
_PRECEDENCE = {"ready": 0, "starting": 1, "draining": 2}


def _version(project: str, model: str, version: str, group: list[Obj]) -> Version:
    problems: list[str] = []
    # The Service is the one named <model>-<version> if it is among them (the same name
    # as the Deployment the autoscaler scales), else the first by name; never slice order.
    services = sorted({str(_labels(s).get(SERVICE_NAME_LABEL, "")) for s in group} - {""})
    wanted = f"{model}-{version}"
    service = wanted if wanted in services or not services else services[0]
    if len(services) > 1:
        problems.append(f"Services {', '.join(services)} all carry this version's labels; "
                        f"scaling deployments/{service}")  # fmt: skip
    own = [s for s in group if str(_labels(s).get(SERVICE_NAME_LABEL, wanted)) == service]
    labels = _labels(min(own, key=_name))
    # A Service with no ready pod keeps a slice with no ports: it says nothing about the
    # protocol (see protocol_known) and is not a problem.
    ported = [s for s in one_address_family(own) if s.get("ports")]
    protocol_known = bool(ported)
    protocol: Protocol = "UPI_V1" if any(_port(s, "grpc") for s in ported) else "HTTP_JSON"
    replicas: dict[str, Replica] = {}
    for s in sorted(ported, key=_name):
        http = _port(s, "http")
        traffic = _port(s, "grpc") if protocol == "UPI_V1" else http
        if traffic is None:
            problems.append(f"EndpointSlice {_name(s)} has no port named "
                            f"{'grpc' if protocol == 'UPI_V1' else 'http'}")  # fmt: skip
            continue
        for ep in s.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            host = str(addresses[0])
            host = f"[{host}]" if ":" in host else host
            cond = ep.get("conditions") or {}
            # The API: a nil ready means ready; terminating endpoints drain.
            if cond.get("terminating"):
                st = "draining"
            elif cond.get("ready", True) is False:
                st = "starting"
            else:
                st = "ready"
            pod = str(((ep.get("targetRef") or {}).get("name")) or host)
            address = f"{host}:{traffic}"
            metrics = f"{host}:{http}" if http is not None else address
            seen = replicas.get(address)
            if seen is None or _PRECEDENCE[st] < _PRECEDENCE[seen.state]:
                replicas[address] = Replica(address, metrics, st, pod)
    request, policy = _autoscaling(labels, problems)
    return Version(
        project=project,
        model=model,
        version=version,
        service=service,
        protocol=protocol,
        replicas=tuple(replicas[a] for a in sorted(replicas)),
        resource_request=request,
        autoscaling=policy,
        problems=tuple(problems),
        protocol_known=protocol_known,
    )


def _labels(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _autoscaling(
    labels: Mapping[str, str], problems: list[str]
) -> tuple[ResourceRequest, AutoscalingPolicy]:
    request_fields: dict[str, Any] = {}
    for label, name in ((MIN_REPLICAS_LABEL, "min_replica"), (MAX_REPLICAS_LABEL, "max_replica")):
        if label in labels:
            request_fields[name] = labels[label]
    try:
        request = ResourceRequest.model_validate(request_fields)
    except ValidationError as exc:
        problems.append(f"labels {MIN_REPLICAS_LABEL}/{MAX_REPLICAS_LABEL}: "
                        + describe_validation_error(exc))  # fmt: skip
        request = ResourceRequest()
    policy_fields: dict[str, Any] = {}
    if METRIC_LABEL in labels:
        policy_fields["metrics_type"] = labels[METRIC_LABEL]
    if TARGET_LABEL in labels:
        policy_fields["target_value"] = labels[TARGET_LABEL]
    try:
        policy = AutoscalingPolicy.model_validate(policy_fields)
    except ValidationError as exc:
        problems.append(f"labels {METRIC_LABEL}/{TARGET_LABEL}: " + describe_validation_error(exc))
        policy = AutoscalingPolicy()
    return request, policy


# --- the whole state ---------------------------------------------------------------------


def _created(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


def derive(
    previous: ControllerState,
    endpoints: Mapping[str, Obj],
    slices: Iterable[Obj],
    *,
    now: float,
) -> Derived:
    versions = versions_from_slices(slices)
    out = Derived(state=previous, versions=versions)
    new_endpoints: dict[str, ModelEndpoint] = {}
    history = {k: list(v) for k, v in previous.history.items()}
    ordered = sorted(endpoints.values(), key=_created)
    invalid: list[tuple[str, str, str]] = []  # (name, key, message), in creation order

    # Valid ModelEndpoints claim their model first, oldest first; an invalid one can't
    # take a model from a valid one, so the outcome doesn't depend on the previous state.
    restored: dict[str, RolloutStatus] = {}
    for obj in ordered:
        name = _name(obj)
        raw = dict(obj.get("spec") or {})
        plan_raw = raw.pop("rollout", None)  # beside the spec the route table carries
        try:
            spec = ModelEndpointSpec.model_validate(raw)
        except ValidationError as exc:
            key = model_key(str(raw.get("project")), str(raw.get("model")))
            invalid.append((name, key, "spec: " + describe_validation_error(exc)))
            continue
        key = model_key(spec.project, spec.model)
        out.keys[name] = key
        if key in out.owners:
            out.conditions[name] = Condition(
                "False", "Conflict",
                f"ModelEndpoint {out.owners[key]} already routes {key}; one ModelEndpoint per "
                "project and model (the oldest wins)",
            )  # fmt: skip
            continue
        out.owners[key] = name
        _read_rollout(out, name, key, plan_raw, obj, previous, restored)
        refusal = _check(spec, versions)
        old = previous.endpoints.get(key)
        if refusal is None:
            same = old is not None and old.rule == spec.rule and old.protocol == spec.protocol
            if same and old is not None:
                new_endpoints[key] = old
            else:
                new_endpoints[key] = ModelEndpoint(project=spec.project, model=spec.model,
                                                   protocol=spec.protocol, rule=spec.rule,
                                                   revision=-1)  # fmt: skip
            out.conditions[name] = Condition("True", "Routed", "the rule is in the route table")
            continue
        reason, message = refusal
        if old is not None and _still_good(old, versions):
            # A refused edit does not take a working model endpoint down.
            new_endpoints[key] = old
            message += f"; still serving the previous rule (revision {old.revision})"
        out.conditions[name] = Condition("False", reason, message)

    for name, key, message in invalid:
        out.keys[name] = key
        old = previous.endpoints.get(key)
        if key not in out.owners:
            out.owners[key] = name
            if old is not None and _still_good(old, versions):
                new_endpoints[key] = old
                message += f"; still serving the previous rule (revision {old.revision})"
        out.conditions[name] = Condition("False", "InvalidRule", message)

    # A routed rule may name a version whose slices are gone: keep it in the table with no
    # replicas (503 for its share) so the table stays valid, and say so.
    table_versions = _version_records(versions, new_endpoints, previous)
    changed_rules = [
        k for k, e in new_endpoints.items()
        if k not in previous.endpoints or previous.endpoints[k] is not e
    ]  # fmt: skip
    # Rollouts go on as the controller runs them; one a new leader has not seen yet is
    # read back from the status the last one wrote. A deleted ModelEndpoint's goes.
    rollouts = {k: r for k, r in {**restored, **previous.rollouts}.items() if k in new_endpoints}
    if (
        not changed_rules
        and set(new_endpoints) == set(previous.endpoints)
        and table_versions == previous.versions
        and rollouts.keys() == previous.rollouts.keys()
    ):
        return out
    revision = previous.revision + 1
    for k in changed_rules:
        e = new_endpoints[k] = new_endpoints[k].model_copy(update={"revision": revision})
        entries = history.setdefault(k, [])
        entries.append(RuleRevision(revision=revision, rule=e.rule, at=now, by="kubernetes"))
        del entries[:-HISTORY_LIMIT]
    out.state = ControllerState(
        revision=revision, versions=table_versions, endpoints=new_endpoints, history=history,
        rollouts=rollouts,
    )  # fmt: skip
    return out


def _read_rollout(
    out: Derived,
    name: str,
    key: str,
    plan_raw: Any,
    obj: Obj,
    previous: ControllerState,
    restored: dict[str, RolloutStatus],
) -> None:
    """spec.rollout (the plan asked for) and status.rollout (the progress written)."""
    if plan_raw is not None:
        try:
            out.plans[key] = RolloutPlan.model_validate(plan_raw)
        except ValidationError as exc:
            out.plan_errors[name] = "spec.rollout: " + describe_validation_error(exc)
    written = (obj.get("status") or {}).get("rollout")
    if key not in previous.rollouts and isinstance(written, dict):
        try:
            restored[key] = RolloutStatus.model_validate(written)
        except ValidationError as exc:
            log.warning("ModelEndpoint %s: status.rollout unreadable, ignored: %s", name,
                        describe_validation_error(exc))  # fmt: skip


def _still_good(old: ModelEndpoint, versions: Mapping[str, Version]) -> bool:
    """Whether a previously routed rule can keep serving: its versions still speak its
    protocol (a vanished version is served as 503, not a reason to drop the rule)."""
    spec = ModelEndpointSpec(project=old.project, model=old.model, protocol=old.protocol,
                             rule=old.rule)  # fmt: skip
    again = _check(spec, versions)
    return again is None or again[0] == "UnknownVersion"


def _check(spec: ModelEndpointSpec, versions: Mapping[str, Version]) -> tuple[str, str] | None:
    """The API's cross-checks (merlin_dp.controller.state._check_routable) against the cluster."""
    for path, name in spec.rule.named_versions():
        v = versions.get(version_key(spec.project, spec.model, name))
        if v is None:
            return "UnknownVersion", (
                f"rule.{path}: no version endpoint {spec.project}/{spec.model}/{name}: no "
                f"EndpointSlice labelled {PROJECT_LABEL}={spec.project}, "
                f"{MODEL_LABEL}={spec.model}, {VERSION_LABEL}={name}"
            )
        if v.protocol_known and v.protocol != spec.protocol:
            return "ProtocolMismatch", (
                f"rule.{path}: version {name} speaks {v.protocol}, the model endpoint "
                f"{spec.protocol}"
            )
    return None


def _version_records(
    versions: Mapping[str, Version],
    endpoints: Mapping[str, ModelEndpoint],
    previous: ControllerState,
) -> dict[str, VersionEndpoint]:
    routed = {
        version_key(e.project, e.model, name): e
        for e in endpoints.values()
        for _, name in e.rule.named_versions()
    }
    records: dict[str, VersionEndpoint] = {}
    for key, v in versions.items():
        protocol = v.protocol
        if not v.protocol_known:
            # No ports to tell (no pod): what routes to it says, else what it said before.
            old = previous.versions.get(key)
            protocol = (routed[key].protocol if key in routed
                        else old.spec.protocol if old is not None else protocol)  # fmt: skip
        rec = VersionEndpoint(
            project=v.project, model=v.model, version=v.version,
            spec=VersionEndpointSpec(type="kubernetes", protocol=protocol,
                                     resource_request=v.resource_request,
                                     autoscaling_policy=v.autoscaling),
            status="serving" if key in routed else "running",
            message="; ".join(v.problems) or f"Service {v.service}",
            replicas=v.ready,
        )  # fmt: skip
        records[key] = _keep_generation(rec, previous.versions.get(key))
    for key, e in routed.items():
        if key in records:
            continue
        project, model, version = key.split("/")
        rec = VersionEndpoint(
            project=project, model=model, version=version,
            spec=VersionEndpointSpec(type="kubernetes", protocol=e.protocol),
            status="failed",
            message="its EndpointSlices are gone (Service deleted?); its traffic gets 503",
        )  # fmt: skip
        records[key] = _keep_generation(rec, previous.versions.get(key))
    return records


def _keep_generation(rec: VersionEndpoint, old: VersionEndpoint | None) -> VersionEndpoint:
    # generation counts changes of what the version is (spec), as in local mode.
    if old is None:
        return rec
    same_spec = old.spec == rec.spec
    generation = old.generation if same_spec else old.generation + 1
    if rec.generation == generation:
        return rec
    return rec.model_copy(update={"generation": generation})


# --- status --------------------------------------------------------------------------------


def status_patch(
    obj: Obj,
    condition: Condition,
    route_revision: int | None,
    now: datetime.datetime,
    rollout: dict[str, Any] | None = None,
    rollout_error: str | None = None,
) -> dict[str, Any] | None:
    """The ``status`` to write, or None when the object already says it (no write storms)."""
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    current = obj.get("status") or {}
    old = next((c for c in current.get("conditions") or [] if c.get("type") == "Ready"), None)
    transition = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if old is not None and old.get("status") == condition.status:
        transition = str(old.get("lastTransitionTime") or transition)
    ready: dict[str, Any] = {
        "type": "Ready",
        "status": condition.status,
        "reason": condition.reason,
        "message": condition.message[:32768],
        "lastTransitionTime": transition,
    }
    status: dict[str, Any] = {"conditions": [ready]}
    if isinstance(generation, int):
        ready["observedGeneration"] = generation
        status["observedGeneration"] = generation
    # None goes out as null: a merge patch deletes the field (leaving it out would keep
    # a stale revision on the object and make every later comparison differ).
    status["routeRevision"] = route_revision
    status["rollout"] = rollout
    status["rolloutError"] = rollout_error
    if _same_status(current, status):
        return None
    return status


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _same_status(current: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("observedGeneration", "routeRevision", "rolloutError")
    if any(current.get(k) != new.get(k) for k in keys):
        return False
    # A merge patch deletes what it sets to null: what was written has no nulls.
    if _without_nulls(current.get("rollout")) != _without_nulls(new.get("rollout")):
        return False
    return list(current.get("conditions") or []) == list(new["conditions"])
