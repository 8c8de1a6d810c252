"""``grpc.health.v1.Health`` on the gateway's gRPC port, asked with the published
``grpcio-health-checking`` client (``HealthStub``) and a model's or version endpoint's
``:authority``. The gateway answers from its route table: the replicas are raw listeners
that count what reaches them (nothing may), and a health check is not traffic. Nothing
asserts a duration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.grpc.health import service_field
from tests.conftest import Gateway, model_endpoint, version
from tests.test_grpc_gateway import channel
from tests.test_protocol_mismatch import Witness

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UPI_SERVICE = "caraml.upi.v1.UniversalPredictionService"


@pytest.fixture
async def witness() -> AsyncIterator[Witness]:
    w = await Witness().start()
    yield w
    await w.stop()


def upi(project: str, model: str, ver: str, replicas: list[str], **extra: Any) -> dict[str, Any]:
    return version(project, model, ver, replicas, protocol="UPI_V1", **extra)


def upi_model(model: str, weights: dict[str, int], **rule: Any) -> dict[str, Any]:
    return {**model_endpoint("fraud", model, weights, **rule), "protocol": "UPI_V1"}


def routes(revision: int, ready: list[str]) -> dict[str, Any]:
    """scorer: 90% to a version with a replica, 10% to one without; idle: its only version
    scaled to zero; down: every weight on a version without a replica, a header match
    to one with; plain: an HTTP_JSON endpoint."""
    return {
        "revision": revision,
        "version_endpoints": [
            upi("fraud", "scorer", "1", ready),
            upi("fraud", "scorer", "2", []),
            upi("fraud", "idle", "1", [], scale_to_zero=True),
            upi("fraud", "down", "1", []),
            upi("fraud", "down", "2", ready),
            version("fraud", "plain", "1", ready),
        ],
        "model_endpoints": [
            upi_model("scorer", {"1": 90, "2": 10}),
            upi_model("idle", {"1": 100}),
            upi_model(
                "down", {"1": 100}, match=[{"header": "x-beta", "exact": "1", "version": "2"}]
            ),
            model_endpoint("fraud", "plain", {"1": 100}),
        ],
    }


def health_stub(ch: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(ch)  # type: ignore[no-untyped-call]


async def check(gw: Gateway, authority: str, service: str = "", **kwargs: Any) -> int:
    async with channel(gw, authority) as ch:
        stub = health_stub(ch)
        resp = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10, **kwargs
        )
    status: int = resp.status
    return status


async def refused(gw: Gateway, authority: str, service: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(gw, authority, service)
    return info.value


async def test_check_answers_for_the_endpoint_the_authority_names(
    gateway_factory: Any, witness: Witness
) -> None:
    gw = await gateway_factory(routes(1, [witness.address]), GatewayConfig(grpc_port=0))
    assert await check(gw, "scorer.fraud.localhost") == SERVING  # one weighted version can
    assert await check(gw, "scorer-1.fraud.localhost:8082") == SERVING  # port ignored
    assert await check(gw, "scorer-2.fraud.localhost") == NOT_SERVING  # no replica
    # At zero, a call would be held while a replica starts: that is serving.
    assert await check(gw, "idle.fraud.localhost") == SERVING
    assert await check(gw, "idle-1.fraud.localhost") == SERVING
    # Only a header match reaches a version with a replica: ordinary calls would fail.
    assert await check(gw, "down.fraud.localhost") == NOT_SERVING
    assert await check(gw, "down-2.fraud.localhost") == SERVING
    # The check follows the table: the replica leaves, scorer can't serve.
    await gw.set_routes(routes(2, []))
    assert await check(gw, "scorer.fraud.localhost") == NOT_SERVING
    assert await check(gw, "scorer-1.fraud.localhost") == NOT_SERVING
    # Answered by the gateway alone, and not traffic: no replica asked, nothing counted
    # (a probe must not keep a version from scaling to zero, nor wake one).
    assert witness.connections == 0
    assert gw.worker is not None
    assert all(v.stats.arrivals == 0 for v in gw.worker.proxy.table.versions)
    assert not any(v["series"] for v in gw.worker.metrics.snapshot()["versions"])
    assert gw.worker.activator.waiting(("fraud", "idle", "1")) == 0


async def test_the_service_names_the_endpoint_or_its_upi_service(
    gateway_factory: Any, witness: Witness
) -> None:
    gw = await gateway_factory(routes(1, [witness.address]), GatewayConfig(grpc_port=0))
    assert await check(gw, "scorer.fraud.localhost", UPI_SERVICE) == SERVING
    assert await check(gw, "scorer-2.fraud.localhost", UPI_SERVICE) == NOT_SERVING
    err = await refused(gw, "scorer.fraud.localhost", "grpc.health.v1.Health")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == (
        f"unknown service 'grpc.health.v1.Health': model endpoint fraud/scorer serves {UPI_SERVICE}"
    )


async def test_unknown_authority_and_http_endpoint(gateway_factory: Any, witness: Witness) -> None:
    gw = await gateway_factory(routes(1, [witness.address]), GatewayConfig(grpc_port=0))
    err = await refused(gw, "nobody.fraud.localhost")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no model endpoint or version endpoint at 'nobody.fraud.localhost'"
    err = await refused(gw, "plain.fraud.localhost")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == "model endpoint fraud/plain serves HTTP_JSON; call it over HTTP"
    assert gw.worker is not None
    assert gw.worker.metrics.unrouted == {404: 1, 400: 1}
    assert witness.connections == 0


async def test_watch_and_list_are_unimplemented(gateway_factory: Any, witness: Witness) -> None:
    gw = await gateway_factory(routes(1, [witness.address]), GatewayConfig(grpc_port=0))
    async with channel(gw, "scorer.fraud.localhost") as ch:
        stub = health_stub(ch)
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch.read()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert info.value.details() == (
            "grpc.health.v1.Health/Watch is not served by the gateway; call Check"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.List(health_pb2.HealthListRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The connection goes on serving.
        resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == SERVING


async def test_a_compressed_request_is_read(gateway_factory: Any, witness: Witness) -> None:
    gw = await gateway_factory(routes(1, [witness.address]), GatewayConfig(grpc_port=0))
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        got = await check(gw, "scorer.fraud.localhost", UPI_SERVICE, compression=compression)
        assert got == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(gw, "scorer.fraud.localhost", "nope", compression=compression)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- the request's decoding, against protobuf's own parser -------------------------------------

UNKNOWN_FIELDS = (
    b"\x10\x96\x01"  # field 2, varint
    + b"\x19" + b"\x01" * 8  # field 3, fixed64
    + b"\x22\x03abc"  # field 4, length-delimited
    + b"\x2d" + b"\x02" * 4  # field 5, fixed32
    + b"\x08\x05"  # field 1 with a varint: not the string, skipped
)  # fmt: skip


@pytest.mark.parametrize(
    "message",
    [
        b"",
        health_pb2.HealthCheckRequest(service="caraml.upi.v1.X").SerializeToString(),
        health_pb2.HealthCheckRequest(service="ünïcode").SerializeToString(),
        UNKNOWN_FIELDS,
        b"\x0a\x01a" + UNKNOWN_FIELDS + b"\x0a\x02bc",  # the last occurrence wins
        b"\x0a" + bytes([0x80 | 200, 1]) + b"s" * 200,  # a two-byte length
    ],
)
def test_the_service_field_decodes_as_protobuf_does(message: bytes) -> None:
    assert service_field(message) == health_pb2.HealthCheckRequest.FromString(message).service


@pytest.mark.parametrize(
    "message",
    [
        b"\x0a\x05abc",  # truncated string
        b"\x0a",  # no length
        b"\x19\x01\x02",  # truncated fixed64
        b"\x0b",  # a group (wire type 3)
        b"\x00\x01",  # field number 0
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x10" + b"\xff" * 11,  # a varint over 10 bytes
    ],
)
def test_a_malformed_request_is_refused_as_protobuf_refuses_it(message: bytes) -> None:
    with pytest.raises(ValueError):
        service_field(message)
    with pytest.raises(Exception):  # noqa: B017 (protobuf's DecodeError)
        health_pb2.HealthCheckRequest.FromString(message)
