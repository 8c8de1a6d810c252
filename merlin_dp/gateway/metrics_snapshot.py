"""The metrics snapshot: what a worker's counters say, as JSON, and how several add up.

A worker exports its counters (:meth:`merlin_dp.gateway.metrics.GatewayMetrics.snapshot`)
as a :class:`Snapshot`; with ``--workers N`` it travels to the supervisor as JSON inside
the worker's report (:mod:`merlin_dp.gateway.supervisor`), where the snapshots of every
worker are merged (:func:`merge_snapshots`) and rendered for ``/metrics``
(:mod:`merlin_dp.gateway.exposition`).

The types are TypedDicts: a snapshot *is* its JSON object, so what the supervisor reads
is byte for byte what workers wrote before the types existed. Records are built in the
key order written here, which is the order on the wire. Two wire keys keep older words
because the other process reads them: ``shadows`` (the mirrored copies' counters) and,
in each of its records, the ``results`` keys ``"<result>|<reason>"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NotRequired, TypedDict

# Labels of a version endpoint: project, model, version.
VersionKey = tuple[str, str, str]


class SeriesRecord(TypedDict):
    """Requests to one version endpoint answered with one status, chosen one way."""

    chosen_by: str  # a CHOSEN_BY label
    code: int  # HTTP status (200 for every gRPC call)
    grpc_code: NotRequired[int]  # only on gRPC calls
    count: int
    sum: float
    buckets: list[int]  # per latency bucket (not cumulative), the last one +Inf


class VersionRecord(TypedDict):
    project: str
    model: str
    version: str
    in_flight: int
    series: list[SeriesRecord]


class MirrorRecord(TypedDict):
    """Mirrored copies to one version endpoint."""

    project: str
    model: str
    version: str
    results: dict[str, int]  # "<result>|<reason>": "sent|", "dropped|concurrency", ...
    compared: int
    mismatch: dict[str, int]  # status | body
    count: int  # copies answered, and their latency
    sum: float
    buckets: list[int]


class ActivationRecord(TypedDict):
    """Requests held for one version endpoint while it started from zero."""

    project: str
    model: str
    version: str
    held: int
    queued: int  # waited for a free slot: every ready replica was at its limit
    overflow: int
    timed_out: int
    pokes: int
    poke_errors: int
    count: int  # requests that got a replica, and how long they waited
    sum: float
    buckets: list[int]


class UpstreamRecord(TypedDict):
    connects: int
    ejections: int
    retries: int
    errors: dict[str, int]  # by UpstreamError kind


class ConnectionsRecord(TypedDict):
    open: int
    refused: int
    head_timeouts: int


class TableRecord(TypedDict):
    revision: int
    errors: int
    source_connected: int  # 1 or 0


class Snapshot(TypedDict):
    versions: list[VersionRecord]
    shadows: list[MirrorRecord]  # the wire key: see the module's docstring
    activations: list[ActivationRecord]
    unrouted: dict[str, int]  # by status code, as text (JSON keys are strings)
    upstream: UpstreamRecord
    connections: ConnectionsRecord
    table: TableRecord


def empty_snapshot() -> Snapshot:
    """No counts, and not connected: what a worker that doesn't answer contributes."""
    return {
        "versions": [],
        "shadows": [],
        "activations": [],
        "unrouted": {},
        "upstream": {"connects": 0, "ejections": 0, "retries": 0, "errors": {}},
        "connections": {"open": 0, "refused": 0, "head_timeouts": 0},
        "table": {"revision": -1, "errors": 0, "source_connected": 0},
    }


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Merge the snapshots of several workers into one.

    Counts add, records with the same labels merge (in the order they first appear), and
    bucket counts add bucket by bucket. Adding is right for every counter and for the
    gauges that count things (requests in flight, client connections open); the two
    gauges about the route table are not counts and take the minimum: the revision every
    worker serves, and ``source_connected`` is 1 only if every worker follows its route
    source (so an alert on 0 fires when any one serves a stale table; a worker that
    doesn't answer counts as not following).
    """
    merged = empty_snapshot()
    versions: dict[VersionKey, VersionRecord] = {}
    series: dict[tuple[VersionKey, str, int, int | None], SeriesRecord] = {}
    mirrors: dict[VersionKey, MirrorRecord] = {}
    activations: dict[VersionKey, ActivationRecord] = {}
    revisions: list[int] = []
    connected: list[int] = []
    for snap in snapshots:
        for v in snap["versions"]:
            key = (v["project"], v["model"], v["version"])
            into = versions.get(key)
            if into is None:
                into = versions[key] = {**v, "series": []}
                merged["versions"].append(into)
            else:
                into["in_flight"] += v["in_flight"]
            for s in v["series"]:
                skey = (key, s["chosen_by"], s["code"], s.get("grpc_code"))
                have = series.get(skey)
                if have is None:
                    series[skey] = have = {**s, "buckets": list(s["buckets"])}
                    into["series"].append(have)
                else:
                    _add_observations(have, s)
        for m in snap["shadows"]:
            key = (m["project"], m["model"], m["version"])
            mirror = mirrors.get(key)
            if mirror is None:
                mirror = mirrors[key] = {
                    **m,
                    "results": dict(m["results"]),
                    "mismatch": dict(m["mismatch"]),
                    "buckets": list(m["buckets"]),
                }
                merged["shadows"].append(mirror)
            else:
                _add_counts(mirror["results"], m["results"])
                mirror["compared"] += m["compared"]
                _add_counts(mirror["mismatch"], m["mismatch"])
                _add_observations(mirror, m)
        for a in snap["activations"]:
            key = (a["project"], a["model"], a["version"])
            act = activations.get(key)
            if act is None:
                act = activations[key] = {**a, "buckets": list(a["buckets"])}
                merged["activations"].append(act)
            else:
                act["held"] += a["held"]
                act["queued"] += a["queued"]
                act["overflow"] += a["overflow"]
                act["timed_out"] += a["timed_out"]
                act["pokes"] += a["pokes"]
                act["poke_errors"] += a["poke_errors"]
                _add_observations(act, a)
        _add_counts(merged["unrouted"], snap["unrouted"])
        up, into_up = snap["upstream"], merged["upstream"]
        into_up["connects"] += up["connects"]
        into_up["ejections"] += up["ejections"]
        into_up["retries"] += up["retries"]
        _add_counts(into_up["errors"], up["errors"])
        conns, into_conns = snap["connections"], merged["connections"]
        into_conns["open"] += conns["open"]
        into_conns["refused"] += conns["refused"]
        into_conns["head_timeouts"] += conns["head_timeouts"]
        table = snap["table"]
        merged["table"]["errors"] += table["errors"]
        revisions.append(table["revision"])
        connected.append(table["source_connected"])
    # Workers may briefly disagree during a swap; the oldest is what is guaranteed.
    merged["table"]["revision"] = min(revisions, default=-1)
    merged["table"]["source_connected"] = min(connected, default=0)
    return merged


class _Observed(TypedDict):
    """The histogram part of a series, mirror or activation record."""

    count: int
    sum: float
    buckets: list[int]


def _add_observations(into: _Observed, item: _Observed) -> None:
    into["count"] += item["count"]
    into["sum"] += item["sum"]
    into["buckets"] = [a + b for a, b in zip(into["buckets"], item["buckets"], strict=True)]


def _add_counts(into: dict[str, int], item: dict[str, int]) -> None:
    for key, n in item.items():
        into[key] = into.get(key, 0) + n
