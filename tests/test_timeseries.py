"""The controller's short time series (merlin_dp/controller/timeseries.py): fed by a real
gateway's ``/signals`` over HTTP through the autoscaler's collector and a real
Autoscaler on a fake runtime and an injected clock; then read as the API answers it.
And end to end: traffic through a real `merlin-dp up`, counted in the series the SDK
reads, and the live stream."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from merlin_dp.autoscaler.collector import GatewaySignals
from merlin_dp.autoscaler.scaler import Autoscaler, ScaledVersion
from merlin_dp.controller.models import ControllerState, ModelEndpoint, VersionEndpoint
from merlin_dp.controller.timeseries import TimeSeries, quantile_ms
from merlin_dp.rollout.evidence import last_countable
from merlin_dp.runtime import ReplicaInfo
from merlin_dp.sdk import Client
from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest, VersionEndpointSpec
from merlin_dp.spec.rule import Rule
from merlin_dp.spec.signals import LATENCY_BUCKETS
from tests.conftest import Replica, Up, running_up
from tests.fakes import FakeClock, FakeRuntime

NOW = 1_000_000.0
EXAMPLE = ["python3", str(Path(__file__).resolve().parent.parent / "examples" / "custom_model.py")]


def histogram(**at_ms: int) -> list[int]:
    """Counts per LATENCY_BUCKETS bucket: ``b5=10`` puts 10 answers in the bucket ending
    at 5 ms."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for name, n in at_ms.items():
        bound = float(name[1:]) / 1000 if name != "over" else None
        counts[LATENCY_BUCKETS.index(bound) if bound is not None else -1] += n
    return counts


def test_quantiles_interpolate_within_the_bucket() -> None:
    assert quantile_ms([], 0.5) is None
    assert quantile_ms(histogram(), 0.99) is None
    # 100 answers between 2.5 and 5 ms: the median halfway, the 99th near the top.
    assert quantile_ms(histogram(b5=100), 0.5) == 3.75
    assert quantile_ms(histogram(b5=100), 0.99) == 4.975
    # Slower than the last bound: reported as that bound, the most the buckets know.
    assert quantile_ms(histogram(b1=50, over=50), 0.99) == 60_000.0


def record(version: str, second: int, requests: int, **more: Any) -> dict[str, Any]:
    return {"project": "fraud", "model": "scorer", "version": version, "second": second,
            "requests": requests, "concurrency": 1.0, "in_service": 1.0, "queued": 0.0,
            "completions": requests, "service_seconds": 0.1 * requests, **more}  # fmt: skip


def version(v: str, replicas: int) -> VersionEndpoint:
    return VersionEndpoint(
        project="fraud", model="scorer", version=v, status="serving",
        spec=VersionEndpointSpec(command=["x"]),
        replicas=[f"127.0.0.1:{9000 + i}" for i in range(replicas)],
    )  # fmt: skip


async def test_seconds_replicas_and_scale_events_as_the_api_reads_them() -> None:
    clock = FakeClock(NOW)
    first = last_countable(NOW) - 4
    records = [
        record("1", first, 90, answered=90, errors=9, latency=histogram(b5=90)),
        record("1", first + 1, 80, answered=80, errors=0, latency=histogram(b10=80)),
        # Version 2 is mirrored to: its copies compared with version 1's answers.
        record("2", first, 0, shadow_answered=40, compared=40, differed=4),
    ]

    async def signals(_: web.Request) -> web.Response:
        return web.json_response({"signals": records})

    app = web.Application()
    app.router.add_get("/signals", signals)
    gateway = await Replica("gw", app).start()
    source = GatewaySignals([f"http://{gateway.address}"])
    runtime = FakeRuntime([ReplicaInfo("r0", "127.0.0.1:9000", "ready", ready_after=1.0)])
    policy = AutoscalingPolicy(metrics_type="rps", target_value=10)
    scaler = Autoscaler(
        lambda: {"fraud/scorer/1": ScaledVersion("fraud", "scorer", "1", policy,
                                                 ResourceRequest(min_replica=1, max_replica=20))},
        runtime, source, clock=clock,
    )  # fmt: skip
    state = ControllerState(
        versions={"fraud/scorer/1": version("1", 1), "fraud/scorer/2": version("2", 2)},
        endpoints={"fraud/scorer": ModelEndpoint(
            project="fraud", model="scorer", protocol="HTTP_JSON", revision=3,
            rule=Rule.model_validate({"destinations": [{"version": "1", "weight": 100}],
                                      "mirror": {"version": "2", "percent": 50}}))},
    )  # fmt: skip
    series = TimeSeries(lambda: state, source, scaler, window=12, clock=clock)
    try:
        series.until = first - 1
        await scaler.tick()  # polls the gateway; 85 requests/s at 10 each: scale up
        assert runtime.asked and runtime.asked[-1] > 1
        await series.tick()
        got = series.model_series("fraud", "scorer")
        assert got.until == last_countable(NOW) and got.signals
        one, two = got.versions
        assert (one.version, two.version) == ("1", "2")
        assert [p.second for p in one.points] == list(range(first, got.until + 1))
        assert [p.requests for p in one.points] == [90, 80, 0, 0, 0]  # quiet seconds are 0
        assert one.points[0].errors == 9 and one.points[0].p50_ms == 3.75
        assert one.points[2].p50_ms is None
        assert {p.ready for p in one.points} == {1} and {p.ready for p in two.points} == {2}
        assert one.points[0].desired == runtime.asked[-1]
        assert (two.points[0].shadow_compared, two.points[0].shadow_differed) == (40, 4)
        assert got.events == []  # decided now: shown once its second has closed
        later = series.model_series("fraud", "scorer", since=first)
        assert later.versions[0].points[0].second == first + 1  # only seconds after since
        clock.advance(3)
        await series.tick()
        [event] = series.model_series("fraud", "scorer", since=got.until).events
        assert (event.version, event.from_replicas) == ("1", 1)
        assert event.to_replicas == runtime.asked[-1] and event.at == NOW
        assert event.reason and not event.cold_start
        assert series.model_series("fraud", "scorer", since=series.until).events == []

        summary = series.overview(lambda p, m, proto: f"http://{m}.{p}.localhost", seconds=5)
        [model] = summary.models
        assert (model.revision, model.url) == (3, "http://scorer.fraud.localhost")
        v1, v2 = model.versions
        assert (v1.weight, v1.mirrored_percent, v2.weight, v2.mirrored_percent) == (100, 0, 0, 50)
        assert v1.rps == 0  # the last 5 closed seconds, 3 s on: none of them had requests
        summary = series.overview(lambda p, m, proto: f"http://{m}.{p}.localhost", seconds=8)
        [model] = summary.models
        v1, v2 = model.versions
        assert v1.rps == (90 + 80) / 8 and v1.error_rate == round(9 / 170, 4)
        # Percentiles of the window's whole histogram, not of per-second percentiles.
        assert v1.p50_ms == quantile_ms(histogram(b5=90, b10=80), 0.5)
        assert v2.shadow_agreement == 0.9 and v2.rps == 0 and v2.error_rate is None

        # The window is bounded: after it passes, only its last seconds are kept.
        clock.advance(20)
        await series.tick()
        kept = series.model_series("fraud", "scorer").versions[0].points
        assert len(kept) == 12 and kept[-1].second == last_countable(NOW + 23)
        # A version that is gone is forgotten.
        del state.versions["fraud/scorer/2"]
        clock.advance(1)
        await series.tick()
        assert [v.version for v in series.model_series("fraud", "scorer").versions] == ["1"]
    finally:
        await scaler.close()
        await gateway.stop()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("series")) as server:
        yield server


def test_traffic_through_up_is_counted_in_the_series_and_streamed(up: Up) -> None:
    client = Client(up.api)
    client.deploy("series/echo/1", command=EXAMPLE, wait=60)
    client.route("series/echo", {"1": 100})
    start = client.series("series/echo").until
    stream = client.watch_series("series/echo", since=start)
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)
    sent = 0
    for _ in range(150):
        conn.request("POST", "/serving/series/echo/v1/predict", body=b'{"instances": [1]}')
        assert conn.getresponse().read() is not None
        sent += 1
    conn.close()
    sent_by = time.time()
    streamed = 0
    for update in stream:  # one line a second, each with only its new seconds
        streamed += sum(p.requests for v in update.versions for p in v.points)
        if update.until > sent_by + 1:
            break
    stream.close()
    assert streamed == sent
    whole = client.series("series/echo", since=start)
    assert sum(p.requests for p in whole.versions[0].points) == sent
    assert all(p.ready == 1 for p in whole.versions[0].points)
    [model] = [m for m in client.overview().models if m.model == "echo"]
    assert model.versions[0].weight == 100 and model.revision is not None
    assert client.whoami().name == "anonymous"
