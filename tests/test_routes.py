"""Route table validation: every bad table is refused whole, naming field and reason."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from merlin_dp.spec.routes import RouteFileError, RouteTableSpec, load_route_file
from tests.conftest import model_endpoint, version


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version_endpoints": [
            version("fraud", "scorer", "1", ["127.0.0.1:9001"]),
            version("fraud", "scorer", "2", ["127.0.0.1:9002"]),
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 90, "2": 10})],
    }
    base.update(over)
    return base


def write(tmp_path: Path, data: Any, name: str = "routes.json") -> Path:
    import json

    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_valid_file_loads(tmp_path: Path) -> None:
    loaded = load_route_file(write(tmp_path, spec(revision=3)))
    assert loaded.revision == 3
    assert [d.weight for d in loaded.model_endpoints[0].rule.destinations] == [90, 10]


def test_yaml_file_loads(tmp_path: Path) -> None:
    text = """
version_endpoints:
  - {project: fraud, model: scorer, version: "1", replicas: ["127.0.0.1:9001"]}
model_endpoints:
  - {project: fraud, model: scorer, rule: {destinations: [{version: "1", weight: 100}]}}
"""
    loaded = load_route_file(write(tmp_path, text, "routes.yaml"))
    assert loaded.model_endpoints[0].rule.destinations[0].version == "1"


BAD = [
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 90, "2": 20})]},
        "weights must sum to 100, got 110",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100, "3": 0})]},
        "model_endpoints.0.rule.destinations.1: no version endpoint fraud/scorer/3",
    ),
    (
        {"model_endpoints": [{"project": "fraud", "model": "scorer", "rule": {
            "destinations": [{"version": "1", "weight": 50}, {"version": "1", "weight": 50}]}}]},
        "version '1' appears more than once",
    ),
    (
        {"model_endpoints": [{"project": "fraud", "model": "scorer", "rule": {
            "destinations": [{"version": "1", "weight": -10}, {"version": "2", "weight": 110}]}}]},
        "greater than or equal to 0",
    ),
    (
        {"model_endpoints": [{"project": "fraud", "model": "scorer", "protocol": "UPI_V1",
                              "rule": {"destinations": [{"version": "1", "weight": 100}]}}]},
        "version 1 speaks HTTP_JSON, the model endpoint UPI_V1",
    ),
    (
        {"version_endpoints": [version("fraud", "scorer", "1", ["localhost"])]},
        "version_endpoints.0.replicas: replica address 'localhost' is not host:port",
    ),
    (
        {"version_endpoints": [version("fraud", "Scorer", "1", [])]},
        "version_endpoints.0.model: String should match pattern",
    ),
    (
        {"version_endpoints": [version("fraud", "scorer", "1", [], colour="red")]},
        "version_endpoints.0.colour: Extra inputs are not permitted",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100}, timeout_seconds=0)]},
        "model_endpoints.0.rule.timeout_seconds: Input should be greater than 0",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            match=[{"header": "X-Tenant", "version": "2"}])]},
        "model_endpoints.0.rule.match.0: give exactly one of exact or regex",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            match=[{"header": "X-Tenant", "regex": "([", "version": "2"}])]},
        "does not compile",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            match=[{"header": "X Tenant", "exact": "a", "version": "2"}])]},
        "model_endpoints.0.rule.match.0.header: String should match pattern",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            match=[{"header": "X-Tenant", "exact": "a", "version": "9"}])]},
        "model_endpoints.0.rule.match.0: no version endpoint fraud/scorer/9",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            sticky={"header": "X-User", "cookie": "s"})]},
        "model_endpoints.0.rule.sticky: give exactly one of header or cookie",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            mirror={"version": "2", "percent": 0})]},
        "model_endpoints.0.rule.mirror.percent: Input should be greater than 0",
    ),
    (
        {"model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100},
            mirror={"version": "7", "percent": 0.5})]},
        "model_endpoints.0.rule.mirror: no version endpoint fraud/scorer/7",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), BAD)
def test_invalid_tables_name_field_and_reason(
    tmp_path: Path, override: dict[str, Any], message: str
) -> None:
    with pytest.raises(RouteFileError) as err:
        load_route_file(write(tmp_path, spec(**override)))
    assert message in str(err.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RouteFileError, match="No such file"):
        load_route_file(tmp_path / "missing.yaml")
    with pytest.raises(RouteFileError, match="not valid json"):
        load_route_file(write(tmp_path, "{nope", "routes.json"))
    with pytest.raises(RouteFileError, match="not valid yaml"):
        load_route_file(write(tmp_path, "a: [1, 2", "routes.yaml"))


def test_weighted_pick_is_accurate_and_constant_time() -> None:
    from merlin_dp.gateway.metrics import VersionStats
    from merlin_dp.gateway.pool.upstream import PoolLimits, UpstreamRegistry
    from merlin_dp.gateway.routing.table import compile_table

    loop = asyncio.new_event_loop()  # the registry's replicas keep it; nothing runs on it
    table = compile_table(
        RouteTableSpec.model_validate(spec()),
        "localhost",
        UpstreamRegistry(loop, PoolLimits()),
        VersionStats,
    )
    loop.close()
    target = table.by_host["scorer.fraud.localhost"]
    rng = random.Random(7)
    counts = {"1": 0, "2": 0}
    for _ in range(10_000):
        counts[target.pick(rng.random).version] += 1  # type: ignore[union-attr]
    assert abs(counts["2"] / 10_000 - 0.10) <= 0.02
    assert len(target.slots) == 100  # type: ignore[union-attr]
