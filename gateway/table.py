"""The compiled route table: an immutable snapshot the hot path reads without locks.

:func:`compile_table` turns a validated :class:`~gateway.routes.RouteTableSpec` into a
:class:`RouteTable` of frozen dataclasses: a dict from host name to target, a dict for
the path form, and per model endpoint a 100-slot array for O(1) weighted choice. The
gateway swaps the whole table by one reference assignment; a request keeps the table
it started with until it finishes.

The snapshot points at runtime objects that outlive it (upstream pools, per-version
counters). Those are owned by registries, so a swap never resets a pool or a counter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.metrics import VersionStats
from gateway.routes import RouteTableSpec, parse_address
from gateway.rule import full_name
from gateway.upstream import Upstream, UpstreamRegistry

WEIGHT_SLOTS = 100


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    timeout: float = 30.0
    retries: int = 2
    idempotent: bool = False


DIRECT_POLICY = RoutePolicy()


@dataclass(frozen=True, slots=True, eq=False)
class VersionTarget:
    """A version endpoint: where a request for one version goes."""

    project: str
    model: str
    version: str
    full_name: str
    upstreams: tuple[Upstream, ...]
    stats: VersionStats
    predict_path: str  # /v1/models/<model>-<version>:predict
    predict_paths: frozenset[str]  # paths rewritten to predict_path
    version_header: str
    relay_headers: bytes  # our response header lines for this version, pre-encoded


@dataclass(frozen=True, slots=True, eq=False)
class ModelTarget:
    """A model endpoint: its stable name, its rule compiled for O(1) choice."""

    project: str
    model: str
    slots: tuple[VersionTarget, ...]  # WEIGHT_SLOTS entries, laid out in rule order
    predict_paths: frozenset[str]
    policy: RoutePolicy

    def pick(self, rand: Callable[[], float] = random.random) -> VersionTarget:
        return self.slots[int(rand() * WEIGHT_SLOTS)]


Target = ModelTarget | VersionTarget


@dataclass(frozen=True, slots=True)
class RouteTable:
    revision: int
    domain: str
    by_host: dict[str, Target] = field(default_factory=dict)
    by_path: dict[str, Target] = field(default_factory=dict)  # "<project>/<name>"
    versions: tuple[VersionTarget, ...] = ()

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
            predict_path=f"/v1/models/{name}:predict",
            predict_paths=frozenset({"/v1/predict"}),
            version_header=ve.version,
            relay_headers=b"X-Model-Version: " + ve.version.encode() + b"\r\n",
        )
        versions[(ve.project, ve.model, ve.version)] = vt
        by_host[f"{name}.{ve.project}.{domain}"] = vt
        by_path[f"{ve.project}/{name}"] = vt
    for me in spec.model_endpoints:
        slots: list[VersionTarget] = []
        for dest in me.rule.destinations:
            slots.extend([versions[(me.project, me.model, dest.version)]] * dest.weight)
        rule = me.rule
        mt = ModelTarget(
            project=me.project,
            model=me.model,
            slots=tuple(slots),
            predict_paths=frozenset({"/v1/predict", f"/v1/models/{me.model}:predict"}),
            policy=RoutePolicy(rule.timeout_seconds, rule.retries, rule.idempotent),
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
    )
