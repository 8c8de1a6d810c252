"""Kubernetes mode's pure part: ModelEndpoints and EndpointSlices in, state and status out."""

from __future__ import annotations

import datetime

from merlin_dp.controller.kubernetes.cluster import (
    Condition,
    derive,
    status_patch,
    versions_from_slices,
)
from merlin_dp.controller.models import ControllerState
from tests.kube import me, slice_object, weights

NOW = 1_000.0


SLICES = [
    slice_object("iris-1-a", "demo", "iris", "1", [("10.0.0.1", 8080, True)]),
    slice_object("iris-2-a", "demo", "iris", "2", [("10.0.0.2", 8080, True)]),
    slice_object("upi-1-a", "demo", "upi", "1", [("10.0.0.3", 9000, True)], port_name="grpc"),
]


def test_slices_become_versions_with_their_ready_endpoints() -> None:
    s = slice_object("iris-1-a", "demo", "iris", "1",
                     [("10.0.0.1", 8080, True), ("10.0.0.2", 8080, False),
                      ("10.0.0.3", 8080, True), ("10.0.0.4", 8080, True)],
                     labels={"merlin-dp.caraml.dev/min-replicas": "0",
                             "merlin-dp.caraml.dev/metric": "rps",
                             "merlin-dp.caraml.dev/target": "20"})  # fmt: skip
    del s["endpoints"][2]["conditions"]["ready"]  # the API: nil means ready
    s["endpoints"][3]["conditions"]["terminating"] = True
    other = slice_object("iris-1-b", "demo", "iris", "1", [("10.0.1.1", 8080, True)])
    unlabelled = slice_object("x", "demo", "iris", "1", [("10.9.9.9", 8080, True)])
    del unlabelled["metadata"]["labels"]["merlin-dp.caraml.dev/version"]
    found = versions_from_slices([s, other, unlabelled])
    assert list(found) == ["demo/iris/1"]
    v = found["demo/iris/1"]
    assert v.ready == ["10.0.0.1:8080", "10.0.0.3:8080", "10.0.1.1:8080"]
    states = {r.address: r.state for r in v.replicas}
    assert states["10.0.0.2:8080"] == "starting" and states["10.0.0.4:8080"] == "draining"
    assert v.protocol == "HTTP_JSON" and v.service == "iris-1"
    assert v.resource_request.min_replica == 0
    assert (v.autoscaling.metrics_type, v.autoscaling.target_value) == ("rps", 20.0)
    upi = versions_from_slices(SLICES)["demo/upi/1"]
    assert upi.protocol == "UPI_V1" and upi.ready == ["10.0.0.3:9000"]


def test_bad_autoscaling_labels_fall_back_to_defaults_and_say_why() -> None:
    s = slice_object("a", "demo", "iris", "1", [("10.0.0.1", 8080, True)],
                     labels={"merlin-dp.caraml.dev/min-replicas": "5",
                             "merlin-dp.caraml.dev/max-replicas": "2",
                             "merlin-dp.caraml.dev/metric": "gpu"})  # fmt: skip
    v = versions_from_slices([s])["demo/iris/1"]
    assert v.resource_request.min_replica == 1 and v.autoscaling.metrics_type == "concurrency"
    assert "min_replica (5) is above max_replica (2)" in v.problems[0]
    assert "metric" in v.problems[1]
    rec = derive(ControllerState(), {}, [s], now=NOW).state.versions["demo/iris/1"]
    assert "min_replica (5)" in rec.message


def test_a_valid_model_endpoint_is_routed_and_nothing_changes_twice() -> None:
    endpoints = {"demo-iris": me("demo-iris", "demo", "iris", weights(v1=90, v2=10))}
    first = derive(ControllerState(revision=7), endpoints, SLICES, now=NOW)
    state = first.state
    assert state.revision == 8
    assert state.endpoints["demo/iris"].revision == 8
    assert state.versions["demo/iris/1"].status == "serving"
    assert state.versions["demo/upi/1"].status == "running"
    assert first.conditions["demo-iris"] == Condition("True", "Routed",
                                                      "the rule is in the route table")  # fmt: skip
    assert [h.by for h in state.history["demo/iris"]] == ["kubernetes"]
    # Replayed ADDED events, a resync: the same picture spends no revision.
    again = derive(state, endpoints, list(reversed(SLICES)), now=NOW + 1)
    assert again.state is state


def test_refusals_name_the_reason_and_keep_the_last_good_rule() -> None:
    good = {"demo-iris": me("demo-iris", "demo", "iris", weights(v1=90, v2=10))}
    state = derive(ControllerState(), good, SLICES, now=NOW).state
    cases = {
        "InvalidRule": (weights(v1=50), "weights must sum to 100, got 50"),
        "UnknownVersion": (weights(v1=50, v3=50), "no version endpoint demo/iris/3"),
    }
    for reason, (rule, text) in cases.items():
        bad = {"demo-iris": me("demo-iris", "demo", "iris", rule)}
        out = derive(state, bad, SLICES, now=NOW)
        cond = out.conditions["demo-iris"]
        assert (cond.status, cond.reason) == ("False", reason)
        assert (
            text in cond.message and "still serving the previous rule (revision 1)" in cond.message
        )
        assert out.state is state  # the old rule keeps serving, no new revision
    mismatch = {"demo-iris": me("demo-iris", "demo", "iris", weights(v1=100), protocol="UPI_V1")}
    out = derive(state, mismatch, SLICES, now=NOW)
    assert out.conditions["demo-iris"].reason == "ProtocolMismatch"
    assert (
        "version 1 speaks HTTP_JSON, the model endpoint UPI_V1"
        in out.conditions["demo-iris"].message
    )
    # A refused protocol edit keeps the HTTP_JSON rule serving too.
    assert out.state is state
    assert "still serving the previous rule" in out.conditions["demo-iris"].message
    fresh = derive(ControllerState(), {"x": me("x", "demo", "iris", weights(v1=50))}, SLICES,
                   now=NOW)  # fmt: skip
    assert fresh.conditions["x"].reason == "InvalidRule" and not fresh.state.endpoints


def test_two_model_endpoints_for_one_model_the_oldest_wins() -> None:
    endpoints = {
        "newer": me("newer", "demo", "iris", weights(v2=100), created="2026-01-02T00:00:00Z"),
        "older": me("older", "demo", "iris", weights(v1=100), created="2026-01-01T00:00:00Z"),
    }
    out = derive(ControllerState(), endpoints, SLICES, now=NOW)
    assert out.state.endpoints["demo/iris"].rule.destinations[0].version == "1"
    assert out.conditions["older"].status == "True"
    assert out.conditions["newer"].reason == "Conflict"
    assert "ModelEndpoint older already routes demo/iris" in out.conditions["newer"].message


def test_a_vanished_version_stays_in_the_table_with_no_replicas() -> None:
    endpoints = {"demo-iris": me("demo-iris", "demo", "iris", weights(v1=90, v2=10))}
    state = derive(ControllerState(), endpoints, SLICES, now=NOW).state
    out = derive(state, endpoints, [s for s in SLICES if s["metadata"]["name"] != "iris-2-a"],
                 now=NOW)  # fmt: skip
    rec = out.state.versions["demo/iris/2"]
    assert (rec.status, rec.replicas) == ("failed", [])
    assert out.state.endpoints["demo/iris"] is state.endpoints["demo/iris"]
    assert out.state.revision == state.revision + 1
    # A deleted ModelEndpoint leaves the table; its versions stop serving.
    gone = derive(out.state, {}, SLICES, now=NOW)
    assert not gone.state.endpoints and gone.state.versions["demo/iris/1"].status == "running"


def test_status_is_written_only_when_it_changes() -> None:
    obj = me("demo-iris", "demo", "iris", weights(v1=100))
    t0 = datetime.datetime(2026, 11, 21, 10, 0, tzinfo=datetime.UTC)
    ready = Condition("True", "Routed", "the rule is in the route table")
    status = status_patch(obj, ready, 12, t0)
    assert status is not None
    assert status["observedGeneration"] == 3 and status["routeRevision"] == 12
    assert status["conditions"][0]["lastTransitionTime"] == "2026-11-21T10:00:00Z"
    obj["status"] = status
    assert status_patch(obj, ready, 12, t0 + datetime.timedelta(hours=1)) is None
    # Same condition status, new message: the transition time stays.
    later = status_patch(obj, Condition("True", "Routed", "other"), 13, t0 + datetime.timedelta(1))
    assert (
        later is not None and later["conditions"][0]["lastTransitionTime"] == "2026-11-21T10:00:00Z"
    )
    flipped = status_patch(
        obj, Condition("False", "InvalidRule", "x"), None, t0 + datetime.timedelta(1)
    )
    assert (
        flipped is not None
        and flipped["conditions"][0]["lastTransitionTime"] == "2026-11-22T10:00:00Z"
    )
    assert flipped["routeRevision"] is None  # null: the merge patch deletes it
