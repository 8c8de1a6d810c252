"""The Open Inference Protocol (KServe V2) over HTTP: tensors in, tensors out.

A model under the contract has one method, ``predict(payload)``, written for V1 JSON. A V2
request is turned into that payload and the answer back into tensors, so every shipped
server (pyfunc and sklearn alike) speaks V2 with no code of its own:

- one input tensor → ``{"instances": rows}``, the data reshaped to the tensor's shape as
  nested lists (row-major): shape ``[2, 4]`` gives two rows of four values. This is what
  KServe's own sklearn server hands its model (the first input as an array);
- several inputs → ``{"instances": records}``, one dict per row, ``{input name: that row
  of the input}``; every input's first dimension is the row count. This is KServe's
  ``content_type: pd`` reading (one column per input), taken whenever there are several
  inputs rather than silently using the first;
- the answer ``{"predictions": [...]}`` (or a bare list) → one output tensor,
  ``output-0`` as KServe names it, shaped by the nesting; predictions that are dicts
  (records) → one output per key, in the first record's key order.

Input datatypes are KServe's: BOOL, INT8…INT64, UINT8…UINT64, FP16 (binary data only,
as KServe refuses it in JSON), FP32, FP64 and BYTES (UTF-8 strings). FP32 and FP16
values are rounded to that precision, as KServe's numpy decoding does; integers are
range-checked. Outputs are BOOL, INT64, FP64 or BYTES by what the predictions hold. The
binary tensor data extension (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data_output`` or an output's ``binary_data``) is honoured both ways, since
KServe's client sends binary data by default from ``set_data_from_numpy``.

The answer names the model by its stable name, not ``<model>-<version>``, and carries no
``model_version`` and no made-up ``id`` (the id is echoed when given): the gateway's
shadow comparison compares two versions' bodies, which must then differ only where the
predictions do. The version is in the gateway's ``X-Model-Version`` header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

# Little-endian struct codes: the binary extension's layout, and a range check for JSON.
STRUCT_CODES = {
    "BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B",
    "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
DATATYPES = frozenset(STRUCT_CODES) | {"BYTES"}
HEADER_LENGTH = "Inference-Header-Content-Length"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class InvalidTensor(ValueError):
    """The request is not a V2 inference request the model can take: 400."""


class UnencodableAnswer(ValueError):
    """The model's answer can't be expressed as V2 output tensors: 500."""


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]  # flat, row-major

    def nested(self) -> Any:
        return _nest(self.data, self.shape)


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[tuple[str, bool | None]] | None  # requested (name, binary_data)
    binary_outputs: bool

    def payload(self) -> dict[str, Any]:
        """The V1 payload ``predict`` takes (module docstring)."""
        if len(self.inputs) == 1:
            return {"instances": self.inputs[0].nested()}
        rows = self.inputs[0].shape[0] if self.inputs[0].shape else -1
        for t in self.inputs:
            if not t.shape or t.shape[0] != rows:
                raise InvalidTensor(
                    "several inputs are read as columns of one table: every input needs "
                    f"the same first dimension (rows); {t.name!r} has shape {t.shape}"
                )
        columns = [(t.name, t.nested()) for t in self.inputs]
        return {"instances": [{name: col[i] for name, col in columns} for i in range(rows)]}


def decode_request(body: bytes, json_length: str | None) -> InferRequest:
    """Parse and check a V2 inference request (JSON, or JSON followed by binary data)."""
    raw = b""
    if json_length is not None:
        try:
            length = int(json_length)
        except ValueError:
            raise InvalidTensor(f"{HEADER_LENGTH} is not a number: {json_length!r}") from None
        if not 0 <= length <= len(body):
            raise InvalidTensor(f"{HEADER_LENGTH} {length} is past the body's {len(body)} bytes")
        body, raw = body[:length], body[length:]
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise InvalidTensor(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidTensor(
            'expected {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}'
        )
    specs: list[Any] = doc["inputs"]
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidTensor('"id" must be a string')
    inputs: list[Tensor] = []
    offset = 0
    for i, spec in enumerate(specs):
        tensor, offset = _input(i, spec, raw, offset)
        inputs.append(tensor)
    if offset != len(raw):
        raise InvalidTensor(f"{len(raw) - offset} bytes of binary data belong to no input")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise InvalidTensor(f"input names must differ: {names}")
    outputs = None
    if doc.get("outputs") is not None:
        outputs = [_requested(o) for o in _list(doc["outputs"], '"outputs"')]
    params = _params(doc, "the request")
    return InferRequest(request_id, inputs, outputs, params.get("binary_data_output") is True)


def encode_response(
    model_name: str, request: InferRequest, result: Any
) -> tuple[bytes, dict[str, str]]:
    """The V2 answer (body and headers) for ``predict``'s result."""
    predictions = result.get("predictions") if isinstance(result, dict) else result
    if not isinstance(predictions, list):
        raise UnencodableAnswer(
            'the model answered without a "predictions" list: there is no tensor to return'
        )
    if predictions and all(isinstance(p, dict) for p in predictions):
        keys = list(predictions[0])
        if any(p.keys() != predictions[0].keys() for p in predictions):
            raise UnencodableAnswer("the prediction records don't all have the same keys")
        outputs = [_output(str(k), [p[k] for p in predictions]) for k in keys]
    else:
        outputs = [_output("output-0", predictions)]
    chosen: list[tuple[Tensor, bool]] = []
    if request.outputs is None:
        chosen = [(t, request.binary_outputs) for t in outputs]
    else:
        by_name = {t.name: t for t in outputs}
        for name, binary in request.outputs:
            if name not in by_name:
                raise InvalidTensor(f"no output {name!r}; the model gives {list(by_name)}")
            chosen.append((by_name[name], request.binary_outputs if binary is None else binary))
    doc: dict[str, Any] = {"model_name": model_name, "outputs": []}
    if request.id is not None:
        doc = {"id": request.id, **doc}
    raws: list[bytes] = []
    for t, binary in chosen:
        entry: dict[str, Any] = {"name": t.name, "shape": t.shape, "datatype": t.datatype}
        if binary:
            packed = _pack(t)
            entry["parameters"] = {"binary_data_size": len(packed)}
            raws.append(packed)
        else:
            entry["data"] = t.data
        doc["outputs"].append(entry)
    head = json.dumps(doc).encode()
    if not raws:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(raws), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }


# --- inputs --------------------------------------------------------------------------


def _input(i: int, spec: Any, raw: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise InvalidTensor(f"input {i} is not an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidTensor(f"input {i} has no name")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidTensor(f"input {name!r}: shape must be a list of non-negative integers")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidTensor(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(sorted(DATATYPES))}"
        )
    assert isinstance(datatype, str)
    count = math.prod(shape)
    size = _params(spec, f"input {name!r}").get("binary_data_size")
    if spec.get("data") is not None:
        if datatype == "FP16":
            raise InvalidTensor(f"input {name!r}: FP16 data can only be sent as binary data")
        flat = _flatten(spec["data"], name)
        if len(flat) != count:
            raise InvalidTensor(
                f"input {name!r}: shape {shape} holds {count} values, the data has {len(flat)}"
            )
        return Tensor(name, shape, datatype, _checked(name, datatype, flat)), offset
    if size is None:
        raise InvalidTensor(f"input {name!r} has neither data nor binary_data_size")
    if type(size) is not int or size < 0 or offset + size > len(raw):
        raise InvalidTensor(
            f"input {name!r}: binary_data_size {size!r} doesn't fit the "
            f"{len(raw) - offset} bytes of binary data left"
        )
    values = _unpack(name, datatype, raw[offset : offset + size], count)
    return Tensor(name, shape, datatype, values), offset + size


def _params(doc: dict[str, Any], what: str) -> dict[str, Any]:
    params = doc.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidTensor(f"{what}: parameters must be an object")
    return params


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidTensor(f"{what} must be a list")
    return value


def _requested(spec: Any) -> tuple[str, bool | None]:
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise InvalidTensor('every requested output needs a "name"')
    binary = _params(spec, f"output {name!r}").get("binary_data")
    return name, binary if isinstance(binary, bool) else None


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major values; V2 allows the data flat or nested to the shape."""
    if not isinstance(data, list):
        raise InvalidTensor(f"input {name!r}: data must be a list")
    if not any(type(v) is list for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if type(v) is list:
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def _checked(name: str, datatype: str, flat: list[Any]) -> list[Any]:
    if datatype == "BYTES":
        if not all(type(v) is str for v in flat):
            raise InvalidTensor(f"input {name!r}: BYTES data must be strings")
        return flat
    if datatype == "BOOL":
        if not all(type(v) is bool for v in flat):
            raise InvalidTensor(f"input {name!r}: BOOL data must be true or false")
        return flat
    fmt = f"<{len(flat)}{STRUCT_CODES[datatype]}"
    try:
        # Packing checks type and range; unpacking rounds FP32 as a float32 array would.
        return list(struct.unpack(fmt, struct.pack(fmt, *flat)))
    except (struct.error, OverflowError) as exc:
        raise InvalidTensor(f"input {name!r}: the data is not {datatype}: {exc}") from None


def _unpack(name: str, datatype: str, raw: bytes, count: int) -> list[Any]:
    if datatype == "BYTES":
        values: list[Any] = []
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidTensor(f"input {name!r}: BYTES data ends inside a length prefix")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise InvalidTensor(f"input {name!r}: BYTES element {len(values)} overruns")
            try:
                values.append(raw[pos : pos + n].decode())
            except UnicodeDecodeError:
                raise InvalidTensor(
                    f"input {name!r}: BYTES element {len(values)} is not UTF-8 text"
                ) from None
            pos += n
        if len(values) != count:
            raise InvalidTensor(
                f"input {name!r}: shape holds {count} values, the binary data has {len(values)}"
            )
        return values
    code = STRUCT_CODES[datatype]
    expected = count * struct.calcsize(code)
    if len(raw) != expected:
        raise InvalidTensor(
            f"input {name!r}: {count} {datatype} values take {expected} bytes, got {len(raw)}"
        )
    return list(struct.unpack(f"<{count}{code}", raw))


def _nest(flat: list[Any], shape: list[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


# --- outputs -------------------------------------------------------------------------


def _output(name: str, value: list[Any]) -> Tensor:
    shape: list[int] = []
    probe: Any = value
    while type(probe) is list:
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level: list[Any] = [value]
    for dim in shape:
        below: list[Any] = []
        for v in level:
            if type(v) is not list or len(v) != dim:
                raise UnencodableAnswer(f"output {name!r} is ragged: not a tensor")
            below.extend(v)
        level = below
    if any(type(v) is list for v in level):
        raise UnencodableAnswer(f"output {name!r} is ragged: not a tensor")
    return Tensor(name, shape, _datatype(name, level), level)


def _datatype(name: str, flat: list[Any]) -> str:
    kinds = {type(v) for v in flat}
    if not kinds or kinds == {float} or kinds == {int, float}:
        return "FP64"  # an empty answer is FP64, as numpy's default dtype makes it in KServe
    if kinds == {bool}:
        return "BOOL"
    if kinds == {int}:
        if all(INT64_MIN <= v <= INT64_MAX for v in flat):
            return "INT64"
        raise UnencodableAnswer(f"output {name!r} has integers beyond INT64")
    if kinds == {str}:
        return "BYTES"
    names = ", ".join(sorted(k.__name__ for k in kinds))
    raise UnencodableAnswer(f"output {name!r} holds {names} values: not one tensor datatype")


def _pack(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        parts = []
        for s in t.data:
            b = s.encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return struct.pack(f"<{len(t.data)}{STRUCT_CODES[t.datatype]}", *t.data)
