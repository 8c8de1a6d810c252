"""KServe V2 / Open Inference Protocol on the shipped model servers' contract app.

A model under the contract (merlin_dp/servers/contract.py) served on a real socket;
requests from a real HTTP client. What the tensors become for ``predict``, what its
answer becomes, the binary extension, and every bad input's 400.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from merlin_dp.servers.contract import BadInput, make_app
from tests.conftest import Replica

CANNED: dict[str, Any] = {
    "ragged": {"predictions": [[1], [2, 3]]},
    "mixed": {"predictions": [1, "a"]},
    "nulls": {"predictions": [None]},
    "keys": {"predictions": [{"a": 1}, {"b": 2}]},
    "huge": {"predictions": [2**64]},
    "no-list": {"result": 1},
}


class Echo:
    """Answers with the instances it was given: what the V2 codec hands ``predict``.

    A BYTES instance naming a canned answer gets that instead; "bad" raises BadInput.
    """

    def __init__(self) -> None:
        self.loaded = threading.Event()
        self.seen: list[Any] = []

    def load(self) -> None:
        self.loaded.wait(30)

    def predict(self, payload: Any) -> Any:
        self.seen.append(payload)
        instances = payload["instances"]
        if instances == ["bad"]:
            raise BadInput("bad instances")
        first = instances[0] if isinstance(instances, list) and instances else None
        if isinstance(first, str) and first in CANNED:
            return CANNED[first]
        return {"predictions": instances}


class Server:
    def __init__(self, replica: Replica, model: Echo, session: aiohttp.ClientSession) -> None:
        self.replica = replica
        self.model = model
        self.session = session

    def url(self, path: str) -> str:
        return f"http://{self.replica.address}{path}"

    async def infer(
        self, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(
            self.url("/v2/models/echo-1/infer"), data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            length = resp.headers.get("Inference-Header-Content-Length")
            doc = json.loads(raw[: int(length)] if length else raw)
            doc["_raw"] = raw[int(length) :] if length else b""
            return resp.status, doc, resp

    async def wait_ready(self) -> None:
        self.model.loaded.set()
        for _ in range(500):
            async with self.session.get(self.url("/v2/health/ready")) as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.01)
        raise AssertionError("the model never loaded")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    model = Echo()
    replica = await Replica("echo", make_app(model, "echo-1", "echo")).start()
    session = aiohttp.ClientSession()
    try:
        yield Server(replica, model, session)
    finally:
        model.loaded.set()
        await session.close()
        await replica.stop()


def tensor(name: str, shape: list[int], datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


async def test_probes_kserve_reads(server: Server) -> None:
    s = server.session
    # Loading: V1 and V2 readiness say no, liveness yes, predictions wait.
    async with s.get(server.url("/v2/health/ready")) as resp:
        assert resp.status == 503 and (await resp.json())["ready"] is False
    async with s.get(server.url("/v2/models/echo-1/ready")) as resp:
        assert resp.status == 503
    status, body, _ = await server.infer({"inputs": [tensor("x", [1], "INT64", [1])]})
    assert status == 503 and body["error"] == "the model is still loading"
    async with s.get(server.url("/")) as resp:
        assert await resp.json() == {"status": "alive"}  # KServe's is_server_live reads it
    async with s.get(server.url("/v2/health/live")) as resp:
        assert await resp.json() == {"live": True}
    await server.wait_ready()
    async with s.get(server.url("/v2/health/ready")) as resp:
        assert await resp.json() == {"ready": True}
    async with s.get(server.url("/v2/models/echo-1/ready")) as resp:
        assert await resp.json() == {"name": "echo", "ready": True}
    async with s.get(server.url("/v1/models/echo-1")) as resp:
        assert await resp.json() == {"name": "echo-1", "ready": True}
    async with s.get(server.url("/v2")) as resp:
        meta = await resp.json()
        assert meta["name"] == "merlin-dataplane" and meta["extensions"] == ["binary_tensor_data"]
        assert isinstance(meta["version"], str)
    async with s.get(server.url("/v2/models/echo-1")) as resp:
        assert await resp.json() == {"name": "echo", "platform": "", "inputs": [], "outputs": []}


async def test_tensors_to_instances_and_back(server: Server) -> None:
    await server.wait_ready()
    cases = [
        # (input, what predict sees, the output tensor)
        (tensor("x", [2, 3], "INT32", [1, 2, 3, 4, 5, 6]), [[1, 2, 3], [4, 5, 6]],
         tensor("output-0", [2, 3], "INT64", [1, 2, 3, 4, 5, 6])),
        # Nested data is the same tensor.
        (tensor("x", [2, 2], "FP64", [[1.5, 2], [3, 4]]), [[1.5, 2.0], [3.0, 4.0]],
         tensor("output-0", [2, 2], "FP64", [1.5, 2.0, 3.0, 4.0])),
        # FP32 rounds as a float32 array does in KServe.
        (tensor("x", [1], "FP32", [0.1]), [struct.unpack("<f", struct.pack("<f", 0.1))[0]],
         tensor("output-0", [1], "FP64", [0.10000000149011612])),
        (tensor("x", [2], "BOOL", [True, False]), [True, False],
         tensor("output-0", [2], "BOOL", [True, False])),
        (tensor("x", [2], "BYTES", ["a", "é"]), ["a", "é"],
         tensor("output-0", [2], "BYTES", ["a", "é"])),
        (tensor("x", [3], "UINT64", [0, 2**63, 1]), [0, 2**63, 1], None),
        (tensor("x", [0, 4], "FP32", []), [], tensor("output-0", [0], "FP64", [])),
    ]  # fmt: skip
    for given, seen, output in cases:
        status, body, _ = await server.infer({"inputs": [given]})
        assert server.model.seen[-1] == {"instances": seen}, given
        if output is None:
            # An integer past INT64 can't be an output tensor.
            assert status == 500 and "beyond INT64" in body["error"]
            continue
        assert status == 200, body
        assert body["outputs"] == [output]
        assert "id" not in body and body["model_name"] == "echo"


async def test_several_inputs_are_records_and_records_are_outputs(server: Server) -> None:
    await server.wait_ready()
    request = {
        "id": "r-1",
        "inputs": [
            tensor("age", [2], "INT64", [30, 40]),
            tensor("city", [2], "BYTES", ["x", "y"]),
            tensor("vec", [2, 2], "FP64", [1, 2, 3, 4]),
        ],
    }
    status, body, resp = await server.infer(request)
    assert status == 200, body
    assert server.model.seen[-1] == {"instances": [
        {"age": 30, "city": "x", "vec": [1.0, 2.0]},
        {"age": 40, "city": "y", "vec": [3.0, 4.0]},
    ]}  # fmt: skip
    assert body["id"] == "r-1"
    assert body["outputs"] == [
        tensor("age", [2], "INT64", [30, 40]),
        tensor("city", [2], "BYTES", ["x", "y"]),
        tensor("vec", [2, 2], "FP64", [1.0, 2.0, 3.0, 4.0]),
    ]
    assert resp.headers["Content-Type"] == "application/json"
    # Only the outputs asked for, in the order asked.
    request["outputs"] = [{"name": "vec"}, {"name": "age"}]
    status, body, _ = await server.infer(request)
    assert [o["name"] for o in body["outputs"]] == ["vec", "age"]


async def test_binary_tensor_data_both_ways(server: Server) -> None:
    await server.wait_ready()
    floats = struct.pack("<4f", 1.5, 2.5, 3.5, 4.5)
    words = b"".join(struct.pack("<I", len(w)) + w for w in (b"hi", "né".encode()))
    head = json.dumps({
        "inputs": [
            {"name": "f", "shape": [2, 2], "datatype": "FP32",
             "parameters": {"binary_data_size": len(floats)}},
            {"name": "w", "shape": [2], "datatype": "BYTES",
             "parameters": {"binary_data_size": len(words)}},
        ],
        "outputs": [{"name": "f", "parameters": {"binary_data": True}}, {"name": "w"}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    status, body, resp = await server.infer(head + floats + words, headers)
    assert status == 200, body
    assert server.model.seen[-1] == {"instances": [
        {"f": [1.5, 2.5], "w": "hi"}, {"f": [3.5, 4.5], "w": "né"}]}  # fmt: skip
    assert resp.headers["Content-Type"] == "application/octet-stream"
    f, w = body["outputs"]
    # "f" asked for binary; "w" named without binary_data follows binary_data_output.
    assert f["parameters"] == {"binary_data_size": 32} and "data" not in f
    assert f["datatype"] == "FP64"
    assert w["parameters"] == {"binary_data_size": 4 + 2 + 4 + 3}
    raw = body["_raw"]
    assert struct.unpack("<4d", raw[:32]) == (1.5, 2.5, 3.5, 4.5)
    assert raw[32:] == words


async def test_bad_requests_are_400_with_a_kserve_error(server: Server) -> None:
    await server.wait_ready()
    x = tensor("x", [2], "INT64", [1, 2])
    cases: list[tuple[Any, str, dict[str, str] | None]] = [
        (b"{", "not JSON", None),
        ({"instances": [[1]]}, '"inputs"', None),
        ({"inputs": []}, '"inputs"', None),
        ({"inputs": [1]}, "input 0 is not an object", None),
        ({"inputs": [{**x, "name": ""}]}, "input 0 has no name", None),
        ({"inputs": [{**x, "shape": [-1]}]}, "non-negative", None),
        ({"inputs": [{**x, "datatype": "FP8"}]}, "datatype 'FP8'", None),
        ({"inputs": [{**x, "shape": [3]}]}, "holds 3 values, the data has 2", None),
        ({"inputs": [tensor("x", [1], "INT8", [300])]}, "not INT8", None),
        ({"inputs": [tensor("x", [1], "INT64", [1.5])]}, "not INT64", None),
        ({"inputs": [tensor("x", [1], "FP32", [1e40])]}, "not FP32", None),
        ({"inputs": [tensor("x", [1], "FP64", ["1"])]}, "not FP64", None),
        ({"inputs": [tensor("x", [1], "FP16", [1.0])]}, "binary data", None),
        ({"inputs": [tensor("x", [1], "BYTES", [1])]}, "must be strings", None),
        ({"inputs": [tensor("x", [1], "BOOL", [1])]}, "true or false", None),
        ({"inputs": [{**x, "data": 5}]}, "data must be a list", None),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "neither data", None),
        ({"inputs": [{**x, "parameters": []}]}, "parameters must be an object", None),
        ({"inputs": [x, x]}, "names must differ", None),
        ({"inputs": [x, tensor("y", [3], "INT64", [1, 2, 3])]}, "same first dimension", None),
        ({"id": 7, "inputs": [x]}, '"id" must be a string', None),
        ({"inputs": [x], "outputs": [{"name": "nope"}]}, "no output 'nope'", None),
        ({"inputs": [x], "outputs": {}}, "must be a list", None),
        ({"inputs": [tensor("x", [1], "BYTES", ["bad"])]}, "bad instances", None),
        ({"inputs": [x]}, "Inference-Header-Content-Length is not a number",
         {"Inference-Header-Content-Length": "x"}),
        ({"inputs": [x]}, "past the body", {"Inference-Header-Content-Length": "9999"}),
    ]  # fmt: skip
    for body, message, headers in cases:
        status, answer, resp = await server.infer(body, headers)
        assert status == 400, (body, answer)
        assert message in answer["error"], (body, answer)
        assert resp.headers["Content-Type"] == "application/json"


async def test_bad_binary_data_is_400(server: Server) -> None:
    await server.wait_ready()

    def binary(spec: dict[str, Any], raw: bytes) -> tuple[bytes, dict[str, str]]:
        head = json.dumps({"inputs": [spec]}).encode()
        return head + raw, {"Inference-Header-Content-Length": str(len(head))}

    def sized(datatype: str, shape: list[int], size: int) -> dict[str, Any]:
        return {"name": "x", "shape": shape, "datatype": datatype,
                "parameters": {"binary_data_size": size}}  # fmt: skip

    cases = [
        (sized("FP32", [2], 8), b"\0" * 4, "doesn't fit"),
        (sized("FP32", [2], 4), b"\0" * 4, "take 8 bytes, got 4"),
        (sized("FP32", [1], 4), b"\0" * 8, "belong to no input"),
        (sized("BYTES", [1], 2), b"\1\0", "inside a length prefix"),
        (sized("BYTES", [1], 5), b"\5\0\0\0a", "overruns"),
        (sized("BYTES", [1], 5), b"\1\0\0\0\xff", "not UTF-8"),
        (sized("BYTES", [2], 5), b"\1\0\0\0a", "the binary data has 1"),
        (sized("INT8", [1], -1), b"", "doesn't fit"),
    ]
    for spec, raw, message in cases:
        status, answer, _ = await server.infer(*binary(spec, raw))
        assert status == 400, (spec, answer)
        assert message in answer["error"], (spec, answer)


async def test_answers_that_are_not_tensors_are_500(server: Server) -> None:
    await server.wait_ready()
    cases = {
        "ragged": "ragged",
        "mixed": "holds int, str values",
        "nulls": "holds NoneType values",
        "keys": "same keys",
        "huge": "beyond INT64",
        "no-list": '"predictions" list',
    }
    for canned, message in cases.items():
        status, body, _ = await server.infer({"inputs": [tensor("x", [1], "BYTES", [canned])]})
        assert status == 500, (canned, body)
        assert message in body["error"], (canned, body)
    # V1 takes the same answers as they are.
    async with server.session.post(
        server.url("/v1/models/echo-1:predict"), json={"instances": ["mixed"]}
    ) as resp:
        assert await resp.json() == {"predictions": [1, "a"]}
