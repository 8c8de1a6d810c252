"""The compiled route table: an immutable snapshot the hot path reads without locks.

:func:`compile_table` turns a validated :class:`~merlin_dp.spec.routes.RouteTableSpec` into a
:class:`RouteTable` of frozen dataclasses: a dict from host name to target, a dict for
the path form, and per model endpoint a 100-slot array for O(1) weighted choice. The
gateway swaps the whole table by one reference assignment; a request keeps the table
it started with until it finishes.

The snapshot points at runtime objects that outlive it (upstream pools, per-version
counters). Those are owned by registries, so a swap never resets a pool or a counter.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from merlin_dp.gateway.metrics import CHOSEN_MATCH, CHOSEN_STICKY, CHOSEN_WEIGHT, VersionStats
from merlin_dp.gateway.pool.upstream import Upstream, UpstreamRegistry
from merlin_dp.spec.endpoints import ModelEndpointSpec
from merlin_dp.spec.routes import RouteTableSpec, parse_address
from merlin_dp.spec.rule import full_name

WEIGHT_SLOTS = 100


class HeaderLookup(Protocol):
    """A request's headers (HTTP) or metadata (gRPC), looked up by name."""

    def get(self, name: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    timeout: float = 30.0
    retries: int = 2
    idempotent: bool = False


DIRECT_POLICY = RoutePolicy()


VersionKey = tuple[str, str, str]  # (project, model, version)

# The paths that name a model, by kind. On a model endpoint, a path naming the model is
# rewritten to the same kind of path naming the chosen version, <model>-<version>: KServe
# V1 (predict, model readiness) and V2 / Open Inference Protocol (infer, model readiness,
# model metadata). Server-wide paths (/, /v2, /v2/health/*) name no model and pass as they
# are. V2's /v2/models/<model>/versions/<v>/… is not rewritten: KServe's clients never send
# it, and a version picked by URL would bypass the rule (a version endpoint's host does that).
PREDICT, V1_READY, V2_INFER, V2_READY, V2_METADATA = range(5)


def model_paths(name: str) -> tuple[str, ...]:
    """The paths naming model (or version endpoint) ``name``, indexed by kind."""
    return (
        f"/v1/models/{name}:predict",
        f"/v1/models/{name}",
        f"/v2/models/{name}/infer",
        f"/v2/models/{name}/ready",
        f"/v2/models/{name}",
    )


@dataclass(frozen=True, slots=True, eq=False)
class VersionTarget:
    """A version endpoint: where a request for one version goes."""

    project: str
    model: str
    version: str
    full_name: str
    upstreams: tuple[Upstream, ...]
    stats: VersionStats
    rewritten: tuple[str, ...]  # by rewrite kind: this version's own paths (model_paths)
    rewrites: dict[str, int]  # a request path here → its rewrite kind
    version_header: str
    relay_headers: bytes  # our response header lines for this version, pre-encoded
    key: VersionKey
    # No replicas means "scaled to zero, hold requests while one starts", not "down".
    scale_to_zero: bool = False
    # Serves UPI_V1 (gRPC), else HTTP_JSON: each front refuses the other's targets.
    grpc: bool = False
    # Requests one replica serves at once (containerConcurrency); 0: no limit. Past it,
    # requests wait in the version's queue (merlin_dp.gateway.activation).
    limit: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class HeaderRoute:
    header: str
    exact: str | None
    regex: re.Pattern[str] | None
    version: VersionTarget

    def matches(self, value: str) -> bool:
        if self.regex is None:
            return value == self.exact
        return self.regex.search(value) is not None


@dataclass(frozen=True, slots=True, eq=False)
class MirrorTarget:
    version: VersionTarget
    fraction: float  # of requests copied, 0 < fraction <= 1
    relative_tolerance: float


@dataclass(frozen=True, slots=True, eq=False)
class ModelTarget:
    """A model endpoint: its stable name, its rule compiled for O(1) choice."""

    project: str
    model: str
    slots: tuple[VersionTarget, ...]  # WEIGHT_SLOTS entries, laid out in rule order
    rewrites: dict[str, int]  # a path naming the model → rewrite kind (model_paths)
    policy: RoutePolicy
    matches: tuple[HeaderRoute, ...] = ()
    sticky_header: str | None = None
    sticky_cookie: str | None = None
    mirror: MirrorTarget | None = None
    weights_only: bool = True  # no match, no sticky: pick() is the whole choice
    grpc: bool = False  # as VersionTarget.grpc; the rule's versions all agree

    def pick(self, rand: Callable[[], float] = random.random) -> VersionTarget:
        return self.slots[int(rand() * WEIGHT_SLOTS)]

    def route(self, headers: HeaderLookup) -> tuple[VersionTarget, int]:
        """Header matches in order, then the sticky key, then the weights."""
        for m in self.matches:
            value = headers.get(m.header)
            if value is not None and m.matches(value):
                return m.version, CHOSEN_MATCH
        key = None
        if self.sticky_header is not None:
            key = headers.get(self.sticky_header)
        elif self.sticky_cookie is not None:
            key = cookie_value(headers.get("Cookie"), self.sticky_cookie)
        if key:
            return self.slots[sticky_slot(key)], CHOSEN_STICKY
        return self.pick(), CHOSEN_WEIGHT


def sticky_slot(key: str) -> int:
    """A caller's place on the weight space: stable across processes and restarts.

    Python's hash() is salted per process; every gateway replica must place a caller
    alike, so we hash with blake2b.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % WEIGHT_SLOTS


def cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip('"')
    return None


Target = ModelTarget | VersionTarget


def describe(target: Target) -> str:
    """The target as the gateway's error messages name it."""
    if isinstance(target, ModelTarget):
        return f"model endpoint {target.project}/{target.model}"
    return f"version endpoint {target.project}/{target.full_name}"


@dataclass(frozen=True, slots=True)
class RouteTable:
    revision: int
    domain: str
    by_host: dict[str, Target] = field(default_factory=dict)
    by_path: dict[str, Target] = field(default_factory=dict)  # "<project>/<name>"
    versions: tuple[VersionTarget, ...] = ()
    by_key: dict[VersionKey, VersionTarget] = field(default_factory=dict)

    def upstreams(self) -> list[Upstream]:
        return [u for v in self.versions for u in v.upstreams]


EMPTY_TABLE = RouteTable(revision=-1, domain="localhost")


def compile_table(
    spec: RouteTableSpec,
    domain: str,
    registry: UpstreamRegistry,
    stats_for: Callable[[str, str, str], VersionStats],
) -> RouteTable:
    """Build the snapshot; registries supply the runtime objects that outlive it."""
    by_host: dict[str, Target] = {}
    by_path: dict[str, Target] = {}
    versions: dict[tuple[str, str, str], VersionTarget] = {}
    for ve in spec.version_endpoints:
        name = full_name(ve.model, ve.version)
        ups = tuple(registry.get(*parse_address(a)) for a in ve.replicas)
        vt = VersionTarget(
            project=ve.project,
            model=ve.model,
            version=ve.version,
            full_name=name,
            upstreams=ups,
            stats=stats_for(ve.project, ve.model, ve.version),
            rewritten=model_paths(name),
            rewrites={"/v1/predict": PREDICT},
            version_header=ve.version,
            relay_headers=b"X-Model-Version: " + ve.version.encode() + b"\r\n",
            key=(ve.project, ve.model, ve.version),
            scale_to_zero=ve.scale_to_zero,
            grpc=ve.protocol == "UPI_V1",
            limit=ve.container_concurrency,
        )
        versions[(ve.project, ve.model, ve.version)] = vt
        by_host[f"{name}.{ve.project}.{domain}"] = vt
        by_path[f"{ve.project}/{name}"] = vt
    for me in spec.model_endpoints:
        slots: list[VersionTarget] = []
        for dest in me.rule.destinations:
            slots.extend([versions[(me.project, me.model, dest.version)]] * dest.weight)
        rule = me.rule

        def target(version: str, me: ModelEndpointSpec = me) -> VersionTarget:
            return versions[(me.project, me.model, version)]

        matches = tuple(
            HeaderRoute(
                header=m.header,
                exact=m.exact,
                regex=re.compile(m.regex) if m.regex is not None else None,
                version=target(m.version),
            )
            for m in rule.match
        )
        mirror = (
            MirrorTarget(
                target(rule.mirror.version),
                rule.mirror.percent / 100,
                rule.mirror.relative_tolerance,
            )
            if rule.mirror is not None
            else None
        )
        sticky = rule.sticky
        mt = ModelTarget(
            project=me.project,
            model=me.model,
            slots=tuple(slots),
            rewrites={"/v1/predict": PREDICT}
            | {path: kind for kind, path in enumerate(model_paths(me.model))},
            policy=RoutePolicy(rule.timeout_seconds, rule.retries, rule.idempotent),
            matches=matches,
            sticky_header=sticky.header if sticky else None,
            sticky_cookie=sticky.cookie if sticky else None,
            mirror=mirror,
            weights_only=not matches and sticky is None,
            grpc=me.protocol == "UPI_V1",
        )
        # A model endpoint's name wins over a version endpoint's on a clash
        # (model "a-1" beside model "a" version "1"): the stable URL is the contract.
        by_host[f"{me.model}.{me.project}.{domain}"] = mt
        by_path[f"{me.project}/{me.model}"] = mt
    return RouteTable(
        revision=spec.revision,
        domain=domain,
        by_host=by_host,
        by_path=by_path,
        versions=tuple(versions.values()),
        by_key=versions,
    )
