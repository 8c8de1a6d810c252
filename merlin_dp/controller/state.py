"""Every change to the controller's state, as a pure function: old state in, new out.

Each operation validates against the current state and either raises
:class:`ApiError` (nothing changed) or returns a new :class:`ControllerState` with the
revision bumped. Merlin's rules live here: at most N deployed versions per model, a
pending version can't be changed, a serving one can't be undeployed, only running
same-protocol versions receive traffic, routed versions are ``serving`` and the rest
``running``. :func:`route_table` compiles a state into what gateways serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol

from merlin_dp.controller.models import (
    ControllerState,
    ModelEndpoint,
    ModelEndpointBody,
    RuleRevision,
    VersionEndpoint,
)
from merlin_dp.rollout.engine import RolloutRefused, abort, begin, pause, resume, rule_for
from merlin_dp.spec.endpoints import ModelEndpointSpec, VersionEndpointSpec
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.routes import RouteTableSpec, RouteTableVersionEndpoint
from merlin_dp.spec.rule import Destination, Protocol, Rule

HISTORY_LIMIT = 100
DEPLOYED = ("pending", "running", "serving")
ROUTABLE = ("running", "serving")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def version_key(project: str, model: str, version: str) -> str:
    return f"{project}/{model}/{version}"


def model_key(project: str, model: str) -> str:
    return f"{project}/{model}"


def check_if_match(current: int | None, if_match: int | None) -> None:
    """Optimistic concurrency: a writer that read revision R may only replace R."""
    if if_match is not None and current is None:
        raise ApiError(
            412,
            "stale_revision",
            f"If-Match {if_match} is stale: there is nothing to match (not created yet, or "
            "deleted); send no If-Match to create it",
        )
    if if_match is not None and current != if_match:
        raise ApiError(
            412,
            "stale_revision",
            f"If-Match {if_match} is stale: the current revision is {current}; "
            "read it again and reapply your change",
        )


def _next(state: ControllerState) -> ControllerState:
    new = state.model_copy(deep=True)
    new.revision = state.revision + 1
    return new


# --- version endpoints ----------------------------------------------------------------


def deploy(
    state: ControllerState,
    project: str,
    model: str,
    version: str,
    spec: VersionEndpointSpec,
    *,
    max_versions: int,
    if_match: int | None = None,
) -> ControllerState:
    key = version_key(project, model, version)
    current = state.versions.get(key)
    live = current is not None and current.status != "terminated"
    check_if_match(current.generation if live and current else None, if_match)
    if current is not None and current.status == "pending":
        raise conflict(f"version endpoint {key} is pending; wait until it is running or failed")
    if (
        current is not None
        and current.status == "serving"
        and current.spec.protocol != spec.protocol
    ):
        raise conflict(f"version endpoint {key} is serving {current.spec.protocol}; "
                       "route traffic away before changing its protocol")  # fmt: skip
    deployed = [
        v for k, v in state.versions.items()
        if k != key and v.project == project and v.model == model and v.status in DEPLOYED
    ]  # fmt: skip
    if len(deployed) >= max_versions:
        names = ", ".join(sorted(v.version for v in deployed))
        raise conflict(
            f"model {project}/{model} already has {len(deployed)} deployed versions ({names}); "
            f"at most {max_versions} may be deployed: undeploy one first"
        )
    new = _next(state)
    keep_serving = current is not None and current.status == "serving"
    new.versions[key] = VersionEndpoint(
        project=project,
        model=model,
        version=version,
        spec=spec,
        status="serving" if keep_serving else "pending",
        replicas=list(current.replicas) if keep_serving and current else [],
        generation=(current.generation + 1) if current else 1,
    )
    return new


def undeploy(
    state: ControllerState, project: str, model: str, version: str, if_match: int | None = None
) -> ControllerState:
    key = version_key(project, model, version)
    current = state.versions.get(key)
    if current is None or current.status == "terminated":
        raise not_found(f"version endpoint {key}")
    check_if_match(current.generation, if_match)
    if current.status == "serving":
        raise conflict(
            f"version endpoint {key} is serving: route its traffic to another version "
            "(PUT .../endpoint or :switch) before undeploying it"
        )
    new = _next(state)
    rec = new.versions[key]
    rec.status = "terminated"
    rec.replicas = []
    rec.message = "undeployed"
    rec.generation += 1
    return new


def runtime_update(
    state: ControllerState,
    key: str,
    *,
    replicas: list[str] | None = None,
    failed: str | None = None,
) -> ControllerState | None:
    """Apply what the runtime observed; None when nothing the state records changed."""
    current = state.versions.get(key)
    if current is None or current.status == "terminated":
        return None
    status, message = current.status, current.message
    ready = current.replicas if replicas is None else sorted(replicas)
    if failed is not None:
        status, message, ready = "failed", failed, []
    elif ready and status == "pending":
        status, message = "running", ""
    if (status, message, ready) == (current.status, current.message, current.replicas):
        return None
    new = _next(state)
    rec = new.versions[key]
    rec.status, rec.message, rec.replicas = status, message, ready
    return new


# --- model endpoints ------------------------------------------------------------------


def set_endpoint(
    state: ControllerState,
    project: str,
    model: str,
    body: ModelEndpointBody,
    *,
    by: str,
    now: float,
    if_match: int | None = None,
) -> ControllerState:
    key = model_key(project, model)
    current = state.endpoints.get(key)
    check_if_match(current.revision if current else None, if_match)
    _no_rollout(state, key)
    return _route(state, project, model, body.rule, body.protocol, by=by, now=now)


def _route(
    state: ControllerState,
    project: str,
    model: str,
    rule: Rule,
    protocol: Protocol,
    *,
    by: str,
    now: float,
) -> ControllerState:
    """The model endpoint routed by ``rule``, in a new revision kept in its history."""
    key = model_key(project, model)
    _check_routable(state, project, model, rule, protocol)
    new = _next(state)
    new.endpoints[key] = ModelEndpoint(
        project=project, model=model, protocol=protocol, rule=rule, revision=new.revision
    )
    history = new.history.setdefault(key, [])
    history.append(RuleRevision(revision=new.revision, rule=rule, at=now, by=by))
    del history[:-HISTORY_LIMIT]
    _settle_serving(new, project, model)
    return new


def _endpoint_to_change(
    state: ControllerState, project: str, model: str, if_match: int | None
) -> tuple[str, ModelEndpoint]:
    """The model endpoint a change is for: it exists, If-Match holds, no rollout runs."""
    key = model_key(project, model)
    current = state.endpoints.get(key)
    if current is None:
        raise not_found(f"model endpoint {key}")
    check_if_match(current.revision, if_match)
    _no_rollout(state, key)
    return key, current


def _unready(state: ControllerState, project: str, model: str, version: str) -> bool:
    """Running but with no ready replica, and not one that may be at zero."""
    rec = state.versions.get(version_key(project, model, version))
    return (rec is not None and rec.status in ROUTABLE and not rec.replicas
            and rec.spec.resource_request.min_replica > 0)  # fmt: skip


def _no_rollout(state: ControllerState, key: str) -> None:
    rollout = state.rollouts.get(key)
    if rollout is not None and rollout.active:
        raise conflict(
            f"a rollout of version {rollout.candidate} is moving {key}'s traffic "
            f"({rollout.phase}{'' if rollout.phase == 'shadow' else f' at {rollout.weight}%'}); "
            "abort it first (POST .../endpoint/rollout:abort)"
        )


def delete_endpoint(
    state: ControllerState, project: str, model: str, if_match: int | None = None
) -> ControllerState:
    key, _ = _endpoint_to_change(state, project, model, if_match)
    new = _next(state)
    del new.endpoints[key]
    _settle_serving(new, project, model)
    return new


def switch(
    state: ControllerState,
    project: str,
    model: str,
    to_version: str | None,
    *,
    by: str,
    now: float,
    if_match: int | None = None,
) -> ControllerState:
    """Blue-green: move 100% from the live version to the other, in one revision."""
    key = model_key(project, model)
    current = state.endpoints.get(key)
    if current is None:
        raise not_found(f"model endpoint {key}")
    live = [d.version for d in current.rule.destinations if d.weight > 0]
    if to_version is None:
        # The live version is the one taking the most traffic; "the other" must be unique.
        main = max(current.rule.destinations, key=lambda d: d.weight).version
        candidates = [
            v.version for v in state.versions.values()
            if v.project == project and v.model == model and v.status in ROUTABLE
            and v.version != main
        ]  # fmt: skip
        if len(candidates) != 1:
            raise conflict(
                f"switch needs to_version: {len(candidates)} running versions besides the live "
                f"one {main} ({', '.join(sorted(candidates)) or 'none'})"
            )
        to_version = candidates[0]
    if live == [to_version]:
        raise conflict(f"version {to_version} already takes all traffic of {key}")
    if _unready(state, project, model, to_version):
        raise conflict(f"version {to_version} has no ready replica; a switch to it is refused")
    rule = current.rule.model_copy(
        update={"destinations": [Destination(version=to_version, weight=100)]}
    )
    return set_endpoint(
        state, project, model, ModelEndpointBody(rule=Rule.model_validate(rule.model_dump()),
                                                 protocol=current.protocol),
        by=by, now=now, if_match=if_match,
    )  # fmt: skip


def rollback(
    state: ControllerState,
    project: str,
    model: str,
    to_revision: int | None,
    *,
    by: str,
    now: float,
    if_match: int | None = None,
) -> ControllerState:
    key = model_key(project, model)
    current = state.endpoints.get(key)
    history = state.history.get(key, [])
    if current is None:
        raise not_found(f"model endpoint {key}")
    earlier = [h for h in history if h.revision < current.revision]
    if to_revision is None:
        if not earlier:
            raise conflict(f"model endpoint {key} has no earlier rule to roll back to")
        chosen = earlier[-1]
    else:
        found = [h for h in history if h.revision == to_revision]
        if not found:
            kept = ", ".join(str(h.revision) for h in history[-10:]) or "none kept"
            raise not_found(f"rule revision {to_revision} of {key} (recent: {kept})")
        chosen = found[0]
    return set_endpoint(
        state, project, model, ModelEndpointBody(rule=chosen.rule, protocol=current.protocol),
        by=by, now=now, if_match=if_match,
    )  # fmt: skip


# --- rollouts ---------------------------------------------------------------------------


def start_rollout(
    state: ControllerState,
    project: str,
    model: str,
    plan: RolloutPlan,
    *,
    by: str,
    now: float,
    if_match: int | None = None,
) -> ControllerState:
    """Begin a rollout: its first rule (the shadow's, or the first canary step's) in one
    revision, and its status beside the model endpoint."""
    key, current = _endpoint_to_change(state, project, model, if_match)
    if _unready(state, project, model, plan.candidate):
        raise conflict(f"version {plan.candidate} has no ready replica yet; start the rollout "
                       "once it has one")  # fmt: skip
    try:
        status = begin(project, model, plan, current.rule, now)
    except RolloutRefused as exc:
        raise conflict(f"{key}: {exc}") from None
    new = _route(state, project, model, rule_for(status), current.protocol, by=by, now=now)
    _mark_revision(status, new.revision)
    new.rollouts[key] = status
    return new


def rollout_moved(
    state: ControllerState, key: str, status: RolloutStatus, *, decisions_before: int, now: float
) -> ControllerState:
    """Store a rollout's new status and route by its rule (when the rule changes) in one
    revision. Refused when the stored rollout is not the one the mover read (another
    controller, or a pause or an abort, got there first)."""
    stored = state.rollouts.get(key)
    if stored is None or stored.started != status.started \
            or len(stored.decisions) != decisions_before:  # fmt: skip
        raise conflict(f"the rollout of {key} changed meanwhile; read it again")
    current = state.endpoints.get(key)
    if current is None:
        raise not_found(f"model endpoint {key}")
    rule = rule_for(status)
    if rule == current.rule:
        new = _next(state)  # paused, resumed, or the shadow still going: traffic as it is
    else:
        new = _route(state, status.project, status.model, rule, current.protocol,
                     by="rollout", now=now)  # fmt: skip
    _mark_revision(status, new.revision)
    new.rollouts[key] = status
    return new


def _mark_revision(status: RolloutStatus, revision: int) -> None:
    """The last decision was carried out by ``revision``."""
    if status.decisions:
        status.decisions[-1] = status.decisions[-1].model_copy(update={"revision": revision})


class RolloutAction(TypingProtocol):
    def __call__(
        self, state: ControllerState, key: str, *, by: str, now: float
    ) -> ControllerState: ...


def pause_rollout(state: ControllerState, key: str, *, by: str, now: float) -> ControllerState:
    def change(status: RolloutStatus) -> None:
        if status.paused:
            raise conflict(f"the rollout of {key} is already paused")
        pause(status, f"paused by {by}", now)

    return _rollout_changed(state, key, change, now)


def resume_rollout(state: ControllerState, key: str, *, by: str, now: float) -> ControllerState:
    def change(status: RolloutStatus) -> None:
        if not status.paused:
            raise conflict(f"the rollout of {key} is not paused")
        resume(status, now)
        status.decisions[-1] = status.decisions[-1].model_copy(
            update={"reason": f"resumed by {by}"}
        )

    return _rollout_changed(state, key, change, now)


def abort_rollout(state: ControllerState, key: str, *, by: str, now: float) -> ControllerState:
    """Back to the rule from before the rollout, in one revision."""
    return _rollout_changed(
        state, key, lambda status: abort(status, f"aborted by {by}", now, 0), now
    )


def _rollout_changed(
    state: ControllerState, key: str, change: Callable[[RolloutStatus], None], now: float
) -> ControllerState:
    stored = state.rollouts.get(key)
    if stored is None:
        raise not_found(f"rollout of {key}")
    if not stored.active:
        raise conflict(f"the rollout of {key} has ended ({stored.phase})")
    status = stored.model_copy(deep=True)
    change(status)
    return rollout_moved(state, key, status, decisions_before=len(stored.decisions), now=now)


def _check_routable(
    state: ControllerState, project: str, model: str, rule: Rule, protocol: str
) -> None:
    for field_path, name in rule.named_versions():
        rec = state.versions.get(version_key(project, model, name))
        where = f"rule.{field_path}"
        if rec is None or rec.status == "terminated":
            raise conflict(f"{where}: version endpoint {project}/{model}/{name} is not deployed")
        if rec.status not in ROUTABLE:
            raise conflict(
                f"{where}: version endpoint {project}/{model}/{name} is {rec.status}; only "
                "running version endpoints can receive traffic"
                + (f" ({rec.message.splitlines()[0]})" if rec.message else "")
            )
        if rec.spec.protocol != protocol:
            raise conflict(
                f"{where}: version {name} speaks {rec.spec.protocol}, the model endpoint {protocol}"
            )


def _settle_serving(state: ControllerState, project: str, model: str) -> None:
    # Any version the rule names is serving (weight 0 too): it can't be undeployed from
    # under the rule.
    endpoint = state.endpoints.get(model_key(project, model))
    routed = {name for _, name in endpoint.rule.named_versions()} if endpoint else set()
    for rec in state.versions.values():
        if rec.project != project or rec.model != model or rec.status not in ROUTABLE:
            continue
        rec.status = "serving" if rec.version in routed else "running"


# --- what gateways serve ----------------------------------------------------------------


def route_table(state: ControllerState) -> RouteTableSpec:
    versions = [
        RouteTableVersionEndpoint(
            project=v.project, model=v.model, version=v.version,
            protocol=v.spec.protocol, replicas=v.replicas,
            # Gateways hold (not refuse) its requests while a replica starts from zero.
            scale_to_zero=v.spec.resource_request.min_replica == 0 and v.status in DEPLOYED,
            container_concurrency=v.spec.concurrency_limit,
        )
        # A failed version stays in the table with no replicas (503 for its traffic) so a
        # rule naming it stays valid until someone routes away.
        for v in state.versions.values()
        if v.status in (*DEPLOYED, "failed")
    ]  # fmt: skip
    endpoints = [
        ModelEndpointSpec(project=e.project, model=e.model, protocol=e.protocol, rule=e.rule)
        for e in state.endpoints.values()
    ]
    return RouteTableSpec(
        revision=state.revision, version_endpoints=versions, model_endpoints=endpoints
    )
