"""Route tables for a gateway's route file: weighted rules, header matches and mirrors,
and the benchmarks' table (one model endpoint over versions 1 and 2, 90/10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

BENCH_PROJECT = "bench"
BENCH_MODEL = "m"
DEFAULT_WEIGHTS: Mapping[str, int] = MappingProxyType({"1": 90, "2": 10})
# The benchmarks' weighted target: the 90/10 split plus a header match that the load
# never triggers, so the match is evaluated on every request and the weights still decide.
BENCH_MATCH_HEADER = "X-Model-Version"


def weighted_rule(weights: Mapping[str, int]) -> dict[str, Any]:
    """A model-endpoint rule splitting traffic across versions by weight."""
    return {"destinations": [{"version": v, "weight": w} for v, w in weights.items()]}


def with_header_match(
    rule: Mapping[str, Any], header: str, exact: str, version: str
) -> dict[str, Any]:
    """`rule` plus a header match (sending `header: exact` to `version`), after any others."""
    match = [*rule.get("match", []), {"header": header, "exact": exact, "version": version}]
    return {**rule, "match": match}


def with_mirror(rule: Mapping[str, Any], version: str, percent: float = 100) -> dict[str, Any]:
    """`rule` plus a mirror copying `percent` of requests to `version` (compared, not served)."""
    return {**rule, "mirror": {"version": version, "percent": percent}}


def canary_match_rule(weights: Mapping[str, int] = DEFAULT_WEIGHTS) -> dict[str, Any]:
    """The weighted rule plus `X-Model-Version: 2` → version 2 (not sent by the load)."""
    return with_header_match(weighted_rule(weights), BENCH_MATCH_HEADER, "2", "2")


def build_routes(
    replica: str,
    *,
    project: str = BENCH_PROJECT,
    model: str = BENCH_MODEL,
    versions: Sequence[str] = tuple(DEFAULT_WEIGHTS),
    model_rule: Mapping[str, Any] | None = None,
    container_concurrency: int | None = None,
) -> dict[str, Any]:
    """A route table: each version served by `replica`, one model endpoint with `model_rule`
    (the 90/10 weighted rule by default; pass one with header matches to bench those);
    `container_concurrency` limits each version's requests per replica (None: the field is
    left out, as a gateway from before it existed needs)."""
    rule = dict(model_rule) if model_rule is not None else weighted_rule(DEFAULT_WEIGHTS)
    limit = (
        {} if container_concurrency is None else {"container_concurrency": container_concurrency}
    )
    return {
        "version_endpoints": [
            {"project": project, "model": model, "version": v, "replicas": [replica], **limit}
            for v in versions
        ],
        "model_endpoints": [{"project": project, "model": model, "rule": rule}],
    }


def write_route_file(routes: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(routes), sort_keys=False))
    return path
