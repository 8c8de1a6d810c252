"""The UPI v1 model server as a real process, called by a real grpc.aio client.

Also: the generated descriptors carry the UPI v1 wire contract (docs/grpc-design.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from merlin_dp.common.net import free_port
from merlin_dp.protos import _generate
from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2, upi_pb2_grpc, variable_pb2
from merlin_dp.servers.upi import METHOD, ports_from_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = ROOT / "examples" / "upi"
BIG = 32 * 1024 * 1024

DOUBLE, INTEGER, STRING = type_pb2.TYPE_DOUBLE, type_pb2.TYPE_INTEGER, type_pb2.TYPE_STRING


@dataclass
class Server:
    grpc_port: int
    http_port: int
    proc: subprocess.Popen[bytes]
    log: Path


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("upi") / "server.log"
    env = {
        **os.environ,
        "CARAML_GRPC_PORT": str(grpc_port),
        "CARAML_HTTP_PORT": str(http_port),
        "CARAML_MODEL_NAME": "scorer",
        "CARAML_MODEL_VERSION": "1",
        "CARAML_MODEL_FULL_NAME": "scorer-1",
        "CARAML_ARTIFACT_LOCATION": str(EXAMPLE_DIR),
        "STORAGE_URI": str(EXAMPLE_DIR),
        "SCORER_SLOW_SECONDS": "3",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "merlin_dp.servers.upi", "row_scorer:RowScorer"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = Server(grpc_port, http_port, proc, log)
    try:
        deadline = time.monotonic() + 60
        while _get_quiet(f"http://127.0.0.1:{http_port}/v1/models/scorer-1") != 200:
            if proc.poll() is not None:
                pytest.fail(f"the UPI server exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the UPI server never became ready:\n{log.read_text()}")
            time.sleep(0.05)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get_quiet(url: str) -> int:
    try:
        return _get(url)[0]
    except OSError:
        return 0


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    options = [
        ("grpc.max_send_message_length", BIG),
        ("grpc.max_receive_message_length", BIG),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as ch:
        yield ch


def predict_values(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[upi_pb2.PredictValuesRequest, upi_pb2.PredictValuesResponse]:
    return channel.unary_unary(
        METHOD,
        request_serializer=upi_pb2.PredictValuesRequest.SerializeToString,
        response_deserializer=upi_pb2.PredictValuesResponse.FromString,
    )


def value(v: float | int | str | None) -> table_pb2.Value:
    if v is None:
        return table_pb2.Value(is_null=True)
    if isinstance(v, str):
        return table_pb2.Value(string_value=v)
    if isinstance(v, int):
        return table_pb2.Value(integer_value=v)
    return table_pb2.Value(double_value=v)


def make_table(
    columns: list[tuple[str, type_pb2.Type]],
    rows: list[tuple[str, list[float | int | str | None]]],
    name: str = "features",
) -> table_pb2.Table:
    return table_pb2.Table(
        name=name,
        columns=[table_pb2.Column(name=n, type=t) for n, t in columns],
        rows=[table_pb2.Row(row_id=rid, values=[value(v) for v in vs]) for rid, vs in rows],
    )


def request(table: table_pb2.Table, prediction_id: str = "p-1") -> upi_pb2.PredictValuesRequest:
    return upi_pb2.PredictValuesRequest(
        prediction_table=table,
        target_name="score",
        prediction_context=[variable_pb2.Variable(name="country", type=STRING, string_value="id")],
        metadata=upi_pb2.RequestMetadata(prediction_id=prediction_id),
    )


def scores(resp: upi_pb2.PredictValuesResponse) -> list[tuple[str, float]]:
    return [(r.row_id, r.values[0].double_value) for r in resp.prediction_result_table.rows]


# --- the server -------------------------------------------------------------------------


async def test_table_in_table_out(channel: grpc.aio.Channel) -> None:
    table = make_table(
        [("a", DOUBLE), ("b", INTEGER), ("city", STRING)],
        [("r1", [1.5, 2, "jakarta"]), ("r2", [None, 40, "bandung"]), ("r3", [0.25, None, None])],
    )
    req = request(table, prediction_id="pred-42")
    req.metadata.request_timestamp.GetCurrentTime()
    resp = await predict_values(channel)(req, timeout=10)
    out = resp.prediction_result_table
    assert out.name == "scores"
    assert [(c.name, c.type) for c in out.columns] == [("score", DOUBLE)]
    assert scores(resp) == [("r1", 3.5), ("r2", 40.0), ("r3", 0.25)]
    assert resp.target_name == "score"
    assert resp.metadata.prediction_id == "pred-42"
    assert [(m.name, m.version) for m in resp.metadata.models] == [("scorer", "1")]


async def test_the_generated_stub_calls_it(channel: grpc.aio.Channel) -> None:
    stub = upi_pb2_grpc.UniversalPredictionServiceStub(channel)  # type: ignore[no-untyped-call]
    table = make_table([("x", INTEGER)], [("", [7]), ("", [-2])])
    resp = await stub.PredictValues(request(table, prediction_id=""), timeout=10)
    assert scores(resp) == [("", 7.0), ("", -2.0)]
    assert resp.metadata.prediction_id == ""
    assert resp.metadata.models[0].name == "scorer"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            make_table(
                [("a", DOUBLE), ("b", DOUBLE)], [("r1", [1.0, 2.0]), ("r2", [1.0, 2.0, 3.0])]
            ),
            "row 1 (row_id 'r2') has 3 values for 2 columns",
        ),
        (make_table([("a", DOUBLE)], [("", [])]), "row 0 has 0 values for 1 columns"),
        (
            make_table([("a", type_pb2.TYPE_UNSPECIFIED)], [("", [1.0])]),
            "column 'a' has no type (DOUBLE, INTEGER or STRING)",
        ),
        (make_table([("a", DOUBLE), ("a", DOUBLE)], []), "column 'a' appears twice"),
        (make_table([("", DOUBLE)], []), "column 0 has no name"),
    ],
)
async def test_a_malformed_table_is_invalid_argument(
    channel: grpc.aio.Channel, table: table_pb2.Table, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await predict_values(channel)(request(table), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"prediction_table: {message}"


async def test_no_table_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await predict_values(channel)(upi_pb2.PredictValuesRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "prediction_table is missing"


async def test_the_models_bad_input_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await predict_values(channel)(request(make_table([], [])), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "the table has no columns to score"


async def test_a_model_exception_is_internal_without_a_trace(channel: grpc.aio.Channel) -> None:
    table = make_table([("a", DOUBLE)], [("", [1.0])], name="fail")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await predict_values(channel)(request(table), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "the model failed: RuntimeError: asked to fail"
    # The server still answers afterwards.
    resp = await predict_values(channel)(request(make_table([("a", DOUBLE)], [("", [2.0])])))
    assert scores(resp) == [("", 2.0)]


async def test_a_message_of_several_megabytes(channel: grpc.aio.Channel) -> None:
    pad = "x" * 1000
    rows: list[tuple[str, list[float | int | str | None]]] = [
        (f"r{i}", [float(i), i, pad]) for i in range(6000)
    ]
    req = request(make_table([("a", DOUBLE), ("b", INTEGER), ("pad", STRING)], rows))
    assert req.ByteSize() > 6_000_000  # past grpc's default 4 MiB receive limit
    resp = await predict_values(channel)(req, timeout=30)
    got = scores(resp)
    assert len(got) == 6000
    assert got[0] == ("r0", 0.0)
    assert got[-1] == ("r5999", 11998.0)


async def test_a_slow_model_runs_past_the_deadline(channel: grpc.aio.Channel) -> None:
    table = make_table([("a", DOUBLE)], [("", [1.0])], name="slow")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await predict_values(channel)(request(table), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    resp = await predict_values(channel)(request(make_table([("a", DOUBLE)], [("", [5.0])])))
    assert scores(resp) == [("", 5.0)]


def test_probes_and_metrics_on_the_http_port(server: Server) -> None:
    status, body = _get(f"http://127.0.0.1:{server.http_port}/v1/models/scorer-1")
    assert status == 200
    assert b'"ready": true' in body
    assert _get(f"http://127.0.0.1:{server.http_port}/")[0] == 200
    assert _get(f"http://127.0.0.1:{server.http_port}/v1/models/other-1")[0] == 404
    status, body = _get(f"http://127.0.0.1:{server.http_port}/metrics")
    assert status == 200
    assert b"merlin_model_requests_total" in body
    assert b"process_cpu_seconds_total" in body


def test_sigterm_stops_it(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "CARAML_GRPC_PORT": str(grpc_port),
        "CARAML_HTTP_PORT": str(http_port),
        "CARAML_MODEL_NAME": "scorer",
        "CARAML_MODEL_VERSION": "2",
        "CARAML_MODEL_FULL_NAME": "scorer-2",
        "CARAML_ARTIFACT_LOCATION": str(EXAMPLE_DIR),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "merlin_dp.servers.upi", "row_scorer:RowScorer"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _get_quiet(f"http://127.0.0.1:{http_port}/v1/models/scorer-2") != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ports_from_the_replica_contract() -> None:
    assert ports_from_env({"CARAML_GRPC_PORT": "9000", "CARAML_HTTP_PORT": "9001"}) == (9000, 9001)
    assert ports_from_env({"CARAML_GRPC_PORT": "9000"}) == (9000, None)
    assert ports_from_env({"CARAML_HTTP_PORT": "9001"}) == (9001, None)
    assert ports_from_env({"CARAML_GRPC_PORT": "9000", "CARAML_HTTP_PORT": "9000"}) == (9000, None)
    with pytest.raises(SystemExit, match="CARAML_GRPC_PORT"):
        ports_from_env({})
    with pytest.raises(SystemExit, match="not a number"):
        ports_from_env({"CARAML_GRPC_PORT": "x"})


# --- the wire contract ------------------------------------------------------------------

# docs/grpc-design.md, "The UPI v1 messages (wire contract)": field name -> number.
CONTRACT: dict[str, dict[str, int]] = {
    "Variable": {
        "name": 1,
        "type": 2,
        "double_value": 3,
        "integer_value": 4,
        "string_value": 5,
    },
    "Table": {"name": 1, "columns": 2, "rows": 3},
    "Column": {"name": 1, "type": 2},
    "Row": {"row_id": 1, "values": 2},
    "Value": {"double_value": 1, "integer_value": 2, "string_value": 3, "is_null": 10},
    "PredictValuesRequest": {
        "prediction_table": 1,
        "target_name": 2,
        "prediction_context": 3,
        "transformer_input": 4,
        "metadata": 10,
    },
    "PredictValuesResponse": {
        "prediction_result_table": 1,
        "target_name": 2,
        "prediction_context": 3,
        "metadata": 10,
    },
    "RequestMetadata": {"prediction_id": 1, "request_timestamp": 2},
    "ResponseMetadata": {
        "prediction_id": 1,
        "models": 2,
        "experiment_name": 3,
        "treatment_name": 4,
    },
    "ModelMetadata": {"name": 1, "version": 2},
    "TransformerInput": {"tables": 1, "variables": 2},
}
# Field -> (label, type or message) where the contract says more than the number.
REPEATED = {
    ("Table", "columns"): "caraml.upi.v1.Column",
    ("Table", "rows"): "caraml.upi.v1.Row",
    ("Row", "values"): "caraml.upi.v1.Value",
    ("PredictValuesRequest", "prediction_context"): "caraml.upi.v1.Variable",
    ("PredictValuesResponse", "prediction_context"): "caraml.upi.v1.Variable",
    ("ResponseMetadata", "models"): "caraml.upi.v1.ModelMetadata",
    ("TransformerInput", "tables"): "caraml.upi.v1.Table",
    ("TransformerInput", "variables"): "caraml.upi.v1.Variable",
}
MODULES = (variable_pb2, table_pb2, upi_pb2)


def _message(name: str) -> Descriptor:
    for module in MODULES:
        if name in module.DESCRIPTOR.message_types_by_name:
            found: Descriptor = module.DESCRIPTOR.message_types_by_name[name]
            return found
    raise AssertionError(f"no message {name}")


def test_the_messages_match_the_wire_contract() -> None:
    declared = {n for m in MODULES for n in m.DESCRIPTOR.message_types_by_name}
    assert declared == set(CONTRACT)
    for name, fields in CONTRACT.items():
        desc = _message(name)
        assert desc.full_name == f"caraml.upi.v1.{name}"
        assert {f.name: f.number for f in desc.fields} == fields, name
        for f in desc.fields:
            repeated = (name, f.name) in REPEATED
            assert f.is_repeated == repeated, (name, f.name)
            if f.message_type is not None and repeated:
                assert f.message_type.full_name == REPEATED[(name, f.name)]
    variable = _message("Variable").fields_by_name
    int64 = variable["integer_value"].TYPE_INT64
    assert variable["integer_value"].type == int64
    assert _message("Value").fields_by_name["integer_value"].type == int64
    for message in ("Variable", "Column"):
        enum_type = _message(message).fields_by_name["type"].enum_type
        assert enum_type is not None and enum_type.full_name == "caraml.upi.v1.Type"
    stamp = _message("RequestMetadata").fields_by_name["request_timestamp"]
    assert stamp.message_type is not None
    assert stamp.message_type.full_name == "google.protobuf.Timestamp"
    singular = {
        ("PredictValuesRequest", "prediction_table"): "caraml.upi.v1.Table",
        ("PredictValuesRequest", "transformer_input"): "caraml.upi.v1.TransformerInput",
        ("PredictValuesRequest", "metadata"): "caraml.upi.v1.RequestMetadata",
        ("PredictValuesResponse", "prediction_result_table"): "caraml.upi.v1.Table",
        ("PredictValuesResponse", "metadata"): "caraml.upi.v1.ResponseMetadata",
    }
    for (message, field), type_name in singular.items():
        ftype = _message(message).fields_by_name[field].message_type
        assert ftype is not None and ftype.full_name == type_name


def test_the_type_enum_and_the_service_match_the_wire_contract() -> None:
    enum: EnumDescriptor = type_pb2.DESCRIPTOR.enum_types_by_name["Type"]
    assert enum.full_name == "caraml.upi.v1.Type"
    assert {v.name: v.number for v in enum.values} == {
        "TYPE_UNSPECIFIED": 0,
        "TYPE_DOUBLE": 1,
        "TYPE_INTEGER": 2,
        "TYPE_STRING": 3,
    }
    service = upi_pb2.DESCRIPTOR.services_by_name["UniversalPredictionService"]
    assert service.full_name == "caraml.upi.v1.UniversalPredictionService"
    [method] = service.methods
    assert method.name == "PredictValues"
    assert method.input_type.full_name == "caraml.upi.v1.PredictValuesRequest"
    assert method.output_type.full_name == "caraml.upi.v1.PredictValuesResponse"
    assert not method.client_streaming and not method.server_streaming
    assert METHOD == "/caraml.upi.v1.UniversalPredictionService/PredictValues"


def test_the_stubs_are_generated_from_the_current_protos() -> None:
    assert [p.name for p in _generate.sources()] == [
        "table.proto",
        "type.proto",
        "upi.proto",
        "variable.proto",
    ]
    assert _generate.is_current()


# --- deployed through the controller and the local runtime ------------------------------


async def test_a_upi_version_deployed_through_the_controller(tmp_path: Path) -> None:
    """`type: pyfunc, protocol: UPI_V1` runs the UPI server on two ports: the replica's
    address (what the route table carries) is gRPC; probes and /metrics are on HTTP."""
    from merlin_dp.controller.server import ControllerConfig, start_controller
    from tests.test_controller_api import BASE, Api

    controller, runner, port = await start_controller(
        ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.2)
    )
    api = Api(f"http://127.0.0.1:{port}")
    try:
        spec = {"type": "pyfunc", "protocol": "UPI_V1", "model_dir": str(EXAMPLE_DIR),
                "pyfunc_class": "row_scorer:RowScorer", "ready_deadline_seconds": 60}  # fmt: skip
        status, body, _ = await api.call("PUT", f"{BASE}/versions/1/endpoint", spec)
        assert status == 202, body
        v1 = await api.wait_status("1", "running", timeout=60)
        [address] = v1["replicas"]
        async with grpc.aio.insecure_channel(address) as channel:
            table = make_table([("a", DOUBLE)], [("r1", [2.5])])
            resp = await predict_values(channel)(request(table), timeout=10)
        assert scores(resp) == [("r1", 2.5)]
        assert [(m.name, m.version) for m in resp.metadata.models] == [("scorer", "1")]
        assert controller.runtime is not None
        [replica] = controller.runtime.replicas("fraud/scorer/1")
        assert replica.metrics_address and replica.metrics_address != address
        code, text = _get(f"http://{replica.metrics_address}/metrics")
        assert code == 200 and b"process_cpu_seconds_total" in text
        # sklearn has no UPI server: refused with the reason, nothing deployed.
        bad = {"type": "sklearn", "protocol": "UPI_V1", "model_dir": str(EXAMPLE_DIR)}
        status, body, _ = await api.call("PUT", f"{BASE}/versions/2/endpoint", bad)
        assert status == 422 and "wrap it as pyfunc" in body["error"]["fields"][0]["message"]
    finally:
        await api.session.close()
        await runner.cleanup()
        await controller.close()
