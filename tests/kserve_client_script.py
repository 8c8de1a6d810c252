"""KServe's own REST client (``kserve.InferenceRESTClient``), driven as a KServe user would.

Run by the python of the kserve client venv (tests/clients.py), never imported by the
project or its tests: kserve 0.21 needs protobuf<7, the project protobuf>=7.35. Reads a
JSON list of calls on stdin and prints a JSON list with one result per call, so the
assertions stay in the tests:

    {"protocol": "v1" | "v2", "op": "is_server_live" | "is_server_ready" |
     "is_model_ready" | "infer", "base_url": ..., "host": <Host header or null>,
     "model": ..., "data": <V1 body>, "inputs": [{"name", "shape", "datatype", "data",
     "binary"}], "id": ..., "parameters": {...}, "outputs": [{"name", "parameters"}]}

gives ``{"value": ..., "version": <X-Model-Version of an infer>}`` or
``{"error": "...", "status": <HTTP status or null>}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import (  # type: ignore[import-not-found]
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.infer_type import RequestedOutput  # type: ignore[import-not-found]
from kserve.utils.numpy_codec import to_np_dtype  # type: ignore[import-not-found]


def infer_request(spec: dict[str, Any]) -> Any:
    inputs = []
    for t in spec["inputs"]:
        tensor = InferInput(name=t["name"], shape=t["shape"], datatype=t["datatype"])
        if t.get("as_given"):
            tensor.data = t["data"]  # exactly as written, e.g. nested rather than flat
        else:
            array = np.array(t["data"], dtype=to_np_dtype(t["datatype"])).reshape(t["shape"])
            tensor.set_data_from_numpy(array, binary_data=bool(t.get("binary")))
        inputs.append(tensor)
    outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in spec.get("outputs", [])]
    return InferRequest(
        model_name=spec["model"],
        infer_inputs=inputs,
        request_id=spec.get("id"),
        parameters=spec.get("parameters"),
        request_outputs=outputs or None,
    )


def plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def response_dict(response: Any) -> dict[str, Any]:
    return {
        "model_name": response.model_name,
        "id": response.id,
        "outputs": [
            {
                "name": o.name,
                "shape": o.shape,
                "datatype": o.datatype,
                "data": plain(o.data),
                # What the client's own decoding makes of it.
                "numpy_shape": list(o.as_numpy().shape),
            }
            for o in response.outputs
        ],
    }


async def call(spec: dict[str, Any]) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol=spec["protocol"], timeout=30))
    headers = {"Host": spec["host"]} if spec.get("host") else None
    base = spec["base_url"]
    op = spec["op"]
    try:
        if op == "is_server_live":
            return {"value": await client.is_server_live(base, headers=headers)}
        if op == "is_server_ready":
            return {"value": await client.is_server_ready(base, headers=headers)}
        if op == "is_model_ready":
            return {"value": await client.is_model_ready(base, spec["model"], headers=headers)}
        if op == "infer":
            data = spec["data"] if spec["protocol"] == "v1" else infer_request(spec)
            seen: dict[str, str] = {}
            result = await client.infer(
                base, data, model_name=spec["model"], headers=headers, response_headers=seen
            )
            value = result if isinstance(result, dict) else response_dict(result)
            version = {k.lower(): v for k, v in seen.items()}.get("x-model-version")
            return {"value": value, "version": version}
        raise ValueError(f"unknown op {op!r}")
    except Exception as exc:
        response = getattr(exc, "response", None)
        return {
            "error": f"{type(exc).__name__}: {exc}",
            "status": getattr(response, "status_code", None),
        }
    finally:
        await client.close()


async def main() -> None:
    calls = json.load(sys.stdin)
    results = [await call(spec) for spec in calls]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
