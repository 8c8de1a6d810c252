"""The gateway's gRPC (UPI_V1) path, end to end: a real ``grpc.aio`` client through a
gateway worker's gRPC listener to real UPI replicas (``python -m merlin_dp.servers.upi``
processes) and to ``grpc.aio`` servers that misbehave on purpose.

Real sockets on 127.0.0.1 throughout; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from merlin_dp.common.net import free_port
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.exposition import render
from merlin_dp.gateway.metrics_snapshot import merge_snapshots
from merlin_dp.protos.caraml.upi.v1 import upi_pb2, upi_pb2_grpc
from merlin_dp.servers.upi import METHOD
from tests.conftest import Gateway, model_endpoint, version
from tests.test_upi_server import DOUBLE, INTEGER, STRING, make_table, request, scores

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = ROOT / "examples" / "upi"
BIG = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", BIG),
    ("grpc.max_receive_message_length", BIG),
    # One connection per channel, never shared between tests' channels.
    ("grpc.use_local_subchannel_pool", 1),
]
PROJECT = "fraud"


@dataclass
class UpiReplica:
    version: str
    grpc_port: int
    http_port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_upi(ver: str, log: Path) -> UpiReplica:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "CARAML_GRPC_PORT": str(grpc_port),
        "CARAML_HTTP_PORT": str(http_port),
        "CARAML_MODEL_NAME": "scorer",
        "CARAML_MODEL_VERSION": ver,
        "CARAML_MODEL_FULL_NAME": f"scorer-{ver}",
        "CARAML_ARTIFACT_LOCATION": str(EXAMPLE_DIR),
        # The "slow" table: past every deadline the tests set (0.3 s, a route's 0.5 s),
        # and what the shutdown test's call in flight takes.
        "SCORER_SLOW_SECONDS": "1",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "merlin_dp.servers.upi", "row_scorer:RowScorer"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return UpiReplica(ver, grpc_port, http_port, proc)


def wait_ready(replicas: list[UpiReplica], log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    for r in replicas:
        url = f"http://127.0.0.1:{r.http_port}/v1/models/scorer-{r.version}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if r.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"UPI replica {r.version} never became ready:\n{log.read_text()}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def upi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, UpiReplica]]:
    """Version 1 and version 2 of fraud/scorer, one replica each, for the module."""
    log = tmp_path_factory.mktemp("upi") / "replicas.log"
    started = {v: start_upi(v, log) for v in ("1", "2")}
    try:
        wait_ready(list(started.values()), log)
        yield started
    finally:
        for r in started.values():
            r.stop()


def spec(
    revision: int,
    replicas: dict[str, list[str]],
    weights: dict[str, int] | None = None,
    **rule: Any,
) -> dict[str, Any]:
    versions = [
        version(PROJECT, "scorer", v, addrs, protocol="UPI_V1") for v, addrs in replicas.items()
    ]
    out: dict[str, Any] = {"revision": revision, "version_endpoints": versions}
    if weights is not None:
        me = model_endpoint(PROJECT, "scorer", weights, **rule)
        out["model_endpoints"] = [{**me, "protocol": "UPI_V1"}]
    return out


async def start_gateway(
    factory: Any, routes: dict[str, Any], config: GatewayConfig | None = None
) -> Gateway:
    base = config or GatewayConfig()
    gw: Gateway = await factory(routes, GatewayConfig(**{**base.__dict__, "grpc_port": 0}))
    return gw


def channel(gw: Gateway, authority: str) -> grpc.aio.Channel:
    assert gw.worker is not None and gw.worker.grpc_port
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{gw.worker.grpc_port}",
        options=[*CHANNEL_OPTIONS, ("grpc.default_authority", authority)],
    )


def stub(ch: grpc.aio.Channel) -> upi_pb2_grpc.UniversalPredictionServiceStub:
    return upi_pb2_grpc.UniversalPredictionServiceStub(ch)  # type: ignore[no-untyped-call]


def small(name: str = "features") -> upi_pb2.PredictValuesRequest:
    return request(make_table([("a", DOUBLE), ("b", INTEGER)], [("r1", [1.5, 2])], name=name))


async def predict(
    ch: grpc.aio.Channel,
    req: upi_pb2.PredictValuesRequest,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 10,
) -> tuple[upi_pb2.PredictValuesResponse, dict[str, str]]:
    call = stub(ch).PredictValues(req, metadata=metadata, timeout=timeout)
    resp = await call
    initial = await call.initial_metadata()
    return resp, {k: str(v) for k, v in initial}


def grpc_series(gw: Gateway) -> list[dict[str, Any]]:
    assert gw.worker is not None
    out = []
    for v in gw.worker.metrics.snapshot()["versions"]:
        for s in v["series"]:
            if "grpc_code" in s:
                out.append({"version": v["version"], **s})
    return out


AUTHORITY = f"scorer.{PROJECT}.localhost"


# --- routing ------------------------------------------------------------------------------


async def test_weights_split_calls_between_versions(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    routes = spec(1, {v: [r.address] for v, r in upi.items()}, {"1": 70, "2": 30})
    gw = await start_gateway(gateway_factory, routes)
    counts: Counter[str] = Counter()
    async with channel(gw, AUTHORITY) as ch:
        for _ in range(200):
            resp, initial = await predict(ch, small())
            # The gateway says which version answered, and the answer agrees.
            assert [m.version for m in resp.metadata.models] == [initial["x-model-version"]]
            assert scores(resp) == [("r1", 3.5)]
            counts[initial["x-model-version"]] += 1
    assert counts["1"] + counts["2"] == 200
    assert 110 <= counts["1"] <= 175, counts  # 140 expected; 5+ sigma either side
    # Per-version metrics, as on HTTP, with the grpc status.
    series = {(s["version"], s["chosen_by"], s["grpc_code"]): s["count"] for s in grpc_series(gw)}
    assert series == {("1", "weight", 0): counts["1"], ("2", "weight", 0): counts["2"]}
    # /metrics carries the grpc_code label (merged across workers as the admin port does).
    assert gw.worker is not None
    text = render(merge_snapshots([gw.worker.metrics.snapshot()])).decode()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("gateway_requests_total{") and 'version="2"' in ln
    )
    assert 'grpc_code="0"' in line and 'code="200"' in line
    assert line.endswith(f" {float(counts['2'])}")


async def test_the_readme_upi_example_client_calls_through_the_gateway(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    """examples/upi/call.py, the README's whole gRPC client, run as a user would."""
    routes = spec(1, {"2": [upi["2"].address]}, {"2": 100})
    gw = await start_gateway(gateway_factory, routes)
    assert gw.worker is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE_DIR / "call.py"),
        "--target",
        f"127.0.0.1:{gw.worker.grpc_port}",
        "--authority",
        AUTHORITY,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    # Rows a=1.5, b=2 and a=null, b=7 (strings ignored, null counts as 0).
    assert out.decode().splitlines() == ["answered by version 2", "r1 [3.5]", "r2 [7.0]"]


async def test_a_version_endpoint_by_its_own_authority(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    routes = spec(1, {v: [r.address] for v, r in upi.items()}, {"1": 100})
    gw = await start_gateway(gateway_factory, routes)
    async with channel(gw, f"scorer-2.{PROJECT}.localhost:443") as ch:
        for _ in range(5):
            resp, initial = await predict(ch, small())
            assert initial["x-model-version"] == "2"
            assert resp.metadata.models[0].version == "2"
    assert {(s["version"], s["chosen_by"]) for s in grpc_series(gw)} == {("2", "direct")}


async def test_metadata_match_and_sticky(gateway_factory: Any, upi: dict[str, UpiReplica]) -> None:
    routes = spec(
        1,
        {v: [r.address] for v, r in upi.items()},
        {"1": 50, "2": 50},
        match=[{"header": "X-Variant", "exact": "beta", "version": "2"}],
        sticky={"header": "x-user"},
    )
    gw = await start_gateway(gateway_factory, routes)
    async with channel(gw, AUTHORITY) as ch:
        for _ in range(10):
            _, initial = await predict(ch, small(), metadata=(("x-variant", "beta"),))
            assert initial["x-model-version"] == "2"
        for user in ("ana", "budi", "citra"):
            seen = set()
            for _ in range(5):
                _, initial = await predict(ch, small(), metadata=(("x-user", user),))
                seen.add(initial["x-model-version"])
            assert len(seen) == 1, (user, seen)
    chosen = {s["chosen_by"] for s in grpc_series(gw)}
    assert chosen == {"match", "sticky"}


# --- the gateway's own answers -------------------------------------------------------------


async def test_unknown_authority_is_not_found(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [upi["1"].address]}, {"1": 100}))
    async with channel(gw, f"nobody.{PROJECT}.localhost") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody.fraud.localhost" in (info.value.details() or "")
    assert gw.worker is not None
    assert gw.worker.metrics.unrouted == {404: 1}


async def test_no_ready_replica_is_unavailable(gateway_factory: Any) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": []}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "has no ready replica" in (info.value.details() or "")
    # A Trailers-Only answer: the version header arrives with the trailers.
    assert dict(info.value.trailing_metadata() or ()).get("x-model-version") == "1"
    assert {(s["version"], s["grpc_code"]) for s in grpc_series(gw)} == {("1", 14)}


async def test_a_refused_connect_is_retried_on_another_replica(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    gw = await start_gateway(gateway_factory, spec(1, {"1": [dead, upi["1"].address]}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        for _ in range(30):
            resp, _ = await predict(ch, small())
            assert scores(resp) == [("r1", 3.5)]
    assert gw.worker is not None
    snap = gw.worker.metrics.snapshot()
    assert snap["upstream"]["retries"] >= 1
    assert snap["upstream"]["errors"].get("connect", 0) >= 1


async def test_every_replica_refusing_is_unavailable(gateway_factory: Any) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    gw = await start_gateway(gateway_factory, spec(1, {"1": dead}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_deadline_exceeded(gateway_factory: Any, upi: dict[str, UpiReplica]) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [upi["1"].address]}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small("slow"), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The gateway and the replica both carry on.
        resp, _ = await predict(ch, small())
        assert scores(resp) == [("r1", 3.5)]
    codes = {s["grpc_code"] for s in grpc_series(gw)}
    # Whichever saw the deadline first: the client's cancel, or the gateway's own.
    assert codes & {1, 4} and 0 in codes
    assert gw.worker is not None
    assert all(v["in_flight"] == 0 for v in gw.worker.metrics.snapshot()["versions"])


async def test_a_client_cancel_ends_the_call_as_cancelled(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [upi["1"].address]}, {"1": 100}))
    assert gw.worker is not None

    def in_flight() -> int:
        return sum(v["in_flight"] for v in gw.worker.metrics.snapshot()["versions"])  # type: ignore[union-attr, misc]

    async with channel(gw, AUTHORITY) as ch:
        call = stub(ch).PredictValues(small("slow"), timeout=30)
        while in_flight() == 0:
            await asyncio.sleep(0.01)
        call.cancel()
        while in_flight():
            await asyncio.sleep(0.01)
        assert {s["grpc_code"] for s in grpc_series(gw)} == {1}  # CANCELLED
        resp, _ = await predict(ch, small())
        assert scores(resp) == [("r1", 3.5)]


async def test_upstream_status_passes_through(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [upi["1"].address]}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(ch).PredictValues(upi_pb2.PredictValuesRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "prediction_table is missing"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small("fail"))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "the model failed: RuntimeError: asked to fail"
    codes = Counter(s["grpc_code"] for s in grpc_series(gw) for _ in range(s["count"]))
    assert codes == {3: 1, 13: 1}


# --- a grpc.aio server of our own (custom metadata, echo of big messages) ------------------


async def echo(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """PredictValues on raw bytes: echoes the request, or aborts when asked to."""
    md = {k: v for k, v in context.invocation_metadata() or ()}
    left = context.time_remaining()
    await context.send_initial_metadata(
        (("x-served-by", "echo"), ("x-time-remaining", "none" if left is None else f"{left:.3f}"))
    )
    if md.get("x-abort") == "yes":
        context.set_trailing_metadata(
            (("x-reason", "bad table"), ("x-detail-bin", b"\x00\x01\xff"))
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the table is bad: über")
    assert md.get("x-request-id")  # the gateway adds one, as on HTTP
    return body


@contextlib.asynccontextmanager
async def serving(method: Any) -> AsyncIterator[str]:
    """A grpc.aio server whose PredictValues is ``method`` on raw bytes: its address."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", BIG),
            ("grpc.max_receive_message_length", BIG),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        "caraml.upi.v1.UniversalPredictionService",
        {"PredictValues": grpc.unary_unary_rpc_method_handler(method)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    async with serving(echo) as address:
        yield address


async def test_a_replica_never_holds_more_calls_than_its_limit(gateway_factory: Any) -> None:
    busy = {"now": 0, "peak": 0}

    async def slow(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        busy["now"] += 1
        busy["peak"] = max(busy["peak"], busy["now"])
        try:
            await asyncio.sleep(0.2)
        finally:
            busy["now"] -= 1
        return body

    async with serving(slow) as address:
        routes = spec(1, {"1": [address]}, {"1": 100})
        routes["version_endpoints"][0]["container_concurrency"] = 1
        gw = await start_gateway(gateway_factory, routes)
        async with channel(gw, AUTHORITY) as ch:
            calls = [raw(ch)(b"call %d" % i, timeout=10) for i in range(5)]
            answers = await asyncio.gather(*calls)
    assert answers == [b"call %d" % i for i in range(5)]
    assert busy["peak"] == 1  # the other four waited in the gateway, not on the replica
    assert gw.worker is not None
    assert gw.worker.metrics.activation(PROJECT, "scorer", "1").queued == 4
    stats = gw.worker.metrics.version(PROJECT, "scorer", "1")
    assert stats.queued == 0 and stats.served == 5 and 0.9 < stats.service_seconds < 1.5


def raw(ch: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return ch.unary_unary(METHOD)


async def test_status_details_and_trailing_metadata_pass_through(
    gateway_factory: Any, echo_server: str
) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [echo_server]}, {"1": 100}))
    async with channel(gw, AUTHORITY) as ch:
        call = raw(ch)(b"hello", metadata=(("x-abort", "yes"),), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "the table is bad: über"
        trailing = dict(err.trailing_metadata() or ())
        assert trailing["x-reason"] == "bad table"
        assert trailing["x-detail-bin"] == b"\x00\x01\xff"
        initial = dict(err.initial_metadata() or ())
        assert initial["x-served-by"] == "echo"
        assert initial["x-model-version"] == "1"


async def test_the_route_timeout_caps_the_deadline(
    gateway_factory: Any, echo_server: str, upi: dict[str, UpiReplica]
) -> None:
    rule = {"timeout_seconds": 2.0}
    gw = await start_gateway(gateway_factory, spec(1, {"1": [echo_server]}, {"1": 100}, **rule))
    async with channel(gw, AUTHORITY) as ch:
        told = {}
        for name, timeout in (("none", None), ("shorter", 1.0), ("longer", 60.0)):
            call = raw(ch)(b"hello", timeout=timeout)
            await call
            told[name] = float(dict(await call.initial_metadata())["x-time-remaining"])
    # The replica is told the deadline that applies: the route's when the client has none
    # or a longer one, the client's when it is shorter.
    # (grpc rounds deadlines up to its timer's grain: allow a few milliseconds.)
    assert 1.5 < told["none"] <= 2.05 and 1.5 < told["longer"] <= 2.05
    assert 0 < told["shorter"] <= 1.05
    # And the gateway enforces it: a slow model, a patient client, the route's 0.5 s.
    gw = await start_gateway(
        gateway_factory, spec(2, {"1": [upi["1"].address]}, {"1": 100}, timeout_seconds=0.5)
    )
    async with channel(gw, AUTHORITY) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await predict(ch, small("slow"), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert {s["grpc_code"] for s in grpc_series(gw)} == {4}


async def test_eight_megabytes_each_way(gateway_factory: Any, echo_server: str) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [echo_server]}, {"1": 100}))
    payload = os.urandom(8 * 1024 * 1024)
    async with channel(gw, AUTHORITY) as ch:
        results = await asyncio.gather(*(raw(ch)(payload, timeout=60) for _ in range(3)))
    assert all(r == payload for r in results)


async def test_a_large_table_through_a_upi_replica(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    gw = await start_gateway(gateway_factory, spec(1, {"1": [upi["1"].address]}, {"1": 100}))
    pad = "x" * 1000
    rows: list[tuple[str, list[float | int | str | None]]] = [
        (f"r{i}", [float(i), i, pad]) for i in range(8000)
    ]
    req = request(make_table([("a", DOUBLE), ("b", INTEGER), ("pad", STRING)], rows))
    assert req.ByteSize() > 8_000_000
    async with channel(gw, AUTHORITY) as ch:
        resp, _ = await predict(ch, req, timeout=60)
    got = scores(resp)
    assert len(got) == 8000 and got[-1] == ("r7999", 15998.0)


# --- replicas dying, scale to zero, mirror ----------------------------------------------------


async def test_a_replica_killed_under_load_fails_only_calls_in_flight(
    gateway_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "replicas.log"
    pair = [start_upi("1", log), start_upi("1", log)]
    try:
        wait_ready(pair, log)
        gw = await start_gateway(
            gateway_factory, spec(1, {"1": [r.address for r in pair]}, {"1": 100})
        )
        concurrency = 8
        ok_after_kill = 0
        failures: list[grpc.StatusCode] = []
        killed = asyncio.Event()
        stop = asyncio.Event()

        async def worker(ch: grpc.aio.Channel) -> None:
            nonlocal ok_after_kill
            while not stop.is_set():
                was_killed = killed.is_set()
                try:
                    resp, _ = await predict(ch, small())
                    assert scores(resp) == [("r1", 3.5)]
                    if was_killed:
                        ok_after_kill += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code())

        async with channel(gw, AUTHORITY) as ch:
            tasks = [asyncio.create_task(worker(ch)) for _ in range(concurrency)]
            while not grpc_series(gw) or grpc_series(gw)[0]["count"] < 200:
                await asyncio.sleep(0.01)
            os.kill(pair[0].proc.pid, signal.SIGKILL)
            killed.set()
            while ok_after_kill < 200:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
        # Only the calls on the dead replica at that moment failed, as UNAVAILABLE.
        assert len(failures) <= concurrency, failures
        assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}
    finally:
        # Off the loop: the gateway on it must answer the replica's shutdown (GOAWAY and
        # a PING); a blocked loop can't, and the replica waited out its 10 s grace.
        for r in pair:
            await asyncio.to_thread(r.stop)


async def test_a_version_at_zero_holds_calls_until_a_replica_is_ready(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    def at_zero(revision: int, replicas: list[str]) -> dict[str, Any]:
        routes = spec(revision, {"1": replicas}, {"1": 100})
        routes["version_endpoints"][0]["scale_to_zero"] = True
        return routes

    gw = await start_gateway(gateway_factory, at_zero(1, []))
    assert gw.worker is not None
    async with channel(gw, AUTHORITY) as ch:
        call = asyncio.ensure_future(predict(ch, small(), timeout=30))
        while gw.worker.activator.waiting((PROJECT, "scorer", "1")) == 0:
            await asyncio.sleep(0.01)
        assert not call.done()
        await gw.set_routes(at_zero(2, [upi["1"].address]))
        resp, initial = await call
    assert scores(resp) == [("r1", 3.5)] and initial["x-model-version"] == "1"
    snap = gw.worker.metrics.snapshot()
    assert snap["activations"][0]["held"] == 1 and snap["activations"][0]["count"] == 1


async def test_a_mirrored_call_is_compared_off_the_hot_path(
    gateway_factory: Any, upi: dict[str, UpiReplica]
) -> None:
    routes = spec(
        1,
        {v: [r.address] for v, r in upi.items()},
        {"1": 100},
        mirror={"version": "2", "percent": 100},
    )
    gw = await start_gateway(gateway_factory, routes)
    assert gw.worker is not None
    async with channel(gw, AUTHORITY) as ch:
        for _ in range(10):
            _, initial = await predict(ch, small())
            assert initial["x-model-version"] == "1"
        with pytest.raises(grpc.aio.AioRpcError):
            await predict(ch, small("fail"))
    for _ in range(500):
        shadows = gw.worker.metrics.snapshot()["shadows"]
        if shadows and shadows[0]["compared"] == 11:
            break
        await asyncio.sleep(0.01)
    [shadow] = shadows
    assert shadow["version"] == "2"
    assert shadow["results"] == {"sent|": 11}
    # Same tables from both versions (model metadata aside); same INTERNAL for "fail".
    assert shadow["compared"] == 11 and shadow["mismatch"] == {}
    # Only version 1 answered the client.
    assert {s["version"] for s in grpc_series(gw)} == {"1"}
    # What a rollout reads: the INTERNAL pair is two server errors, not a comparison.
    await asyncio.sleep(1.2)
    records: list[dict[str, Any]] = [dict(r) for r in gw.worker.signals.since(0)]

    def total(version: str, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in records if r["version"] == version)

    assert (total("1", "answered"), total("1", "errors")) == (11, 1)
    assert (total("2", "shadow_answered"), total("2", "shadow_errors")) == (11, 1)
    assert (total("2", "compared"), total("2", "differed")) == (10, 0)


async def test_shutdown_drains_calls_in_flight(
    gateway_factory: Any, upi: dict[str, UpiReplica], tmp_path: Path
) -> None:
    gw = await Gateway(tmp_path, GatewayConfig(grpc_port=0, shutdown_seconds=10)).start(
        spec(1, {"1": [upi["1"].address]}, {"1": 100})
    )
    try:
        async with channel(gw, AUTHORITY) as ch:
            call = asyncio.ensure_future(predict(ch, small("slow"), timeout=30))
            while not grpc_series(gw) and not any(
                v["in_flight"]
                for v in gw.worker.metrics.snapshot()["versions"]  # type: ignore[union-attr]
            ):
                await asyncio.sleep(0.01)
            await gw.stop()
            resp, _ = await call
            assert scores(resp) == [("r1", 3.5)]
    finally:
        gw.worker = None
        gw.session = None
