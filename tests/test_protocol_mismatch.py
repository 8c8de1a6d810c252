"""A call in the wrong protocol is refused at the gateway, never sent to the replica: gRPC
to an HTTP_JSON endpoint is UNIMPLEMENTED, HTTP to a UPI_V1 endpoint the JSON 400
``wrong_protocol``. The replicas are raw listeners that count what reaches them; the
clients are grpcio's and aiohttp's. Nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from merlin_dp.gateway.config import GatewayConfig
from tests.conftest import model_endpoint, version
from tests.test_grpc_gateway import channel, predict, small
from tests.test_h2_frames import RawServer


class Witness(RawServer):
    """A listener standing in for a replica: it reads whatever comes and answers nothing."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            self.received += len(data)
        writer.close()


@pytest.fixture
async def witness() -> AsyncIterator[Witness]:
    w = await Witness().start()
    yield w
    await w.stop()


def routes(address: str, protocol: str) -> dict[str, Any]:
    me = model_endpoint("fraud", "scorer", {"1": 100})
    return {
        "revision": 1,
        "version_endpoints": [version("fraud", "scorer", "1", [address], protocol=protocol)],
        "model_endpoints": [{**me, "protocol": protocol}],
    }


async def test_a_grpc_call_to_an_http_json_endpoint_is_unimplemented(
    gateway_factory: Any, witness: Witness
) -> None:
    gw = await gateway_factory(routes(witness.address, "HTTP_JSON"), GatewayConfig(grpc_port=0))
    for authority, name in (
        ("scorer.fraud.localhost", "model endpoint fraud/scorer"),
        ("scorer-1.fraud.localhost", "version endpoint fraud/scorer-1"),
    ):
        async with channel(gw, authority) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await predict(ch, small())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert info.value.details() == f"{name} serves HTTP_JSON; call it over HTTP"
    assert witness.connections == 0 and witness.received == 0
    metrics = gw.worker.metrics.snapshot()
    # Counted as the gateway's own answers are, before a version was chosen.
    assert metrics["unrouted"] == {"400": 2}
    assert all(not v["series"] for v in metrics["versions"])
    assert all(v.stats.arrivals == 0 for v in gw.worker.proxy.table.versions)
    assert gw.worker.registry.stats.errors == {}


@pytest.mark.parametrize("grpc_port", [0, None])
async def test_an_http_request_to_a_upi_endpoint_is_refused(
    gateway_factory: Any, witness: Witness, grpc_port: int | None
) -> None:
    gw = await gateway_factory(
        routes(witness.address, "UPI_V1"), GatewayConfig(grpc_port=grpc_port)
    )
    where = (
        f"the gateway's gRPC port ({gw.worker.grpc_port})"
        if grpc_port is not None
        else "a gateway's gRPC port (this one serves none: --grpc-port)"
    )
    for host, path, name in (
        ("scorer.fraud.localhost", "/v1/predict", "model endpoint fraud/scorer"),
        (
            "scorer-1.fraud.localhost",
            "/v1/models/scorer-1:predict",
            "version endpoint fraud/scorer-1",
        ),
        ("127.0.0.1", "/serving/fraud/scorer/v1/predict", "model endpoint fraud/scorer"),
    ):
        headers = {"X-Request-Id": f"wrong-{host}"}
        async with gw.request(
            "POST", host, path, json={"instances": [[1]]}, headers=headers
        ) as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"].startswith("application/json")
            assert resp.headers["X-Request-Id"] == f"wrong-{host}"
            error = (await resp.json())["error"]
        assert error == {
            "code": "wrong_protocol",
            "message": f"{name} serves UPI_V1 (gRPC); call it over gRPC on {where}",
        }
    assert witness.connections == 0 and witness.received == 0
    metrics = gw.worker.metrics.snapshot()
    assert metrics["unrouted"] == {"400": 3}
    assert all(not v["series"] for v in metrics["versions"])
    assert all(v.stats.arrivals == 0 for v in gw.worker.proxy.table.versions)
