"""`python -m merlin_dp.servers.upi module:Class`: serve a user's model over UPI v1 (gRPC).

The UPI_V1 counterpart of :mod:`merlin_dp.servers.pyfunc`. The class lives in the model
directory (``CARAML_ARTIFACT_LOCATION``, put first on ``sys.path``); it is constructed with
no arguments, gets ``load()`` once, then ``predict(table)`` per call of
``caraml.upi.v1.UniversalPredictionService/PredictValues``:

- ``table`` is a :class:`Table`: ``columns`` (names), ``rows`` (lists of ``float``, ``int``,
  ``str`` or ``None`` for a null, one per column, typed by the request's column types),
  ``row_ids`` (one per row, ``""`` where the caller gave none), ``name``;
- it returns a :class:`Table` (``predict`` may be ``async``; a sync one runs in a worker
  thread). Column types are inferred from the values: all ``int`` → INTEGER, numbers →
  DOUBLE, ``str`` → STRING, a column of nulls only → UNSPECIFIED. When the result has as
  many rows as the request and no ``row_ids`` of its own, the request's are carried over.
- raising :class:`merlin_dp.servers.contract.BadInput` answers INVALID_ARGUMENT with its
  message; any other exception answers INTERNAL (type and message, never a traceback).

The response's ``metadata`` echoes the request's ``prediction_id`` and names the model
(``CARAML_MODEL_NAME`` / ``CARAML_MODEL_VERSION``); ``target_name`` is echoed too. A table
the server can't read (a row with more or fewer values than there are columns, a column
without a name or a type, duplicate column names) answers INVALID_ARGUMENT before the
model sees it. Messages up to 64 MiB are accepted each way.

Ports (the replica contract): gRPC on ``CARAML_GRPC_PORT`` (falling back to
``CARAML_HTTP_PORT`` when only that is set); readiness ``GET /v1/models/<full name>``,
liveness ``GET /`` and Prometheus ``GET /metrics`` over HTTP on ``CARAML_HTTP_PORT`` when
it is set as well, to a different port. The local runtime can manage this server only when
it sets both, probes the HTTP one and routes to the gRPC one; with one port there are no
HTTP probes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2
from merlin_dp.servers.contract import LATENCY, REQUESTS, BadInput, bind_host
from merlin_dp.servers.merlin_contract import (
    MerlinUpiModel,
    answers_upi,
    artifacts_in,
    require_contract,
)
from merlin_dp.servers.pyfunc import load_class

log = logging.getLogger("model")

Scalar = float | int | str | None
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = upi_pb2.DESCRIPTOR.services_by_name["UniversalPredictionService"].full_name
METHOD = f"/{SERVICE}/PredictValues"


@dataclass
class Table:
    """The Python side of a UPI ``Table``: column names and rows of plain values."""

    columns: list[str]
    rows: list[list[Scalar]]
    row_ids: list[str] = field(default_factory=list)
    name: str = ""


class UpiModel(Protocol):
    def load(self) -> None: ...

    def predict(self, table: Table) -> Table | Awaitable[Table]: ...


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- protobuf <-> Table ----------------------------------------------------------------


def table_from_proto(msg: table_pb2.Table) -> Table:
    """Read a request's table; :class:`BadInput` says what is wrong with it."""
    names: list[str] = []
    types: list[int] = []
    for i, col in enumerate(msg.columns):
        if not col.name:
            raise BadInput(f"column {i} has no name")
        if col.name in names:
            raise BadInput(f"column {col.name!r} appears twice")
        if col.type not in (type_pb2.TYPE_DOUBLE, type_pb2.TYPE_INTEGER, type_pb2.TYPE_STRING):
            raise BadInput(f"column {col.name!r} has no type (DOUBLE, INTEGER or STRING)")
        names.append(col.name)
        types.append(col.type)
    rows: list[list[Scalar]] = []
    row_ids: list[str] = []
    for r, row in enumerate(msg.rows):
        if len(row.values) != len(names):
            which = f"row {r}" + (f" (row_id {row.row_id!r})" if row.row_id else "")
            raise BadInput(f"{which} has {len(row.values)} values for {len(names)} columns")
        values: list[Scalar] = []
        for value, kind in zip(row.values, types, strict=True):
            if value.is_null:
                values.append(None)
            elif kind == type_pb2.TYPE_DOUBLE:
                values.append(value.double_value)
            elif kind == type_pb2.TYPE_INTEGER:
                values.append(value.integer_value)
            else:
                values.append(value.string_value)
        rows.append(values)
        row_ids.append(row.row_id)
    return Table(columns=names, rows=rows, row_ids=row_ids, name=msg.name)


def table_to_proto(table: Table) -> table_pb2.Table:
    """Write the model's result; :class:`ValueError` says what is wrong with it."""
    if not isinstance(table, Table):
        raise ValueError(f"predict() returned {type(table).__name__}, not a Table")
    width = len(table.columns)
    if table.row_ids and len(table.row_ids) != len(table.rows):
        raise ValueError(f"{len(table.row_ids)} row_ids for {len(table.rows)} rows")
    for r, row in enumerate(table.rows):
        if len(row) != width:
            raise ValueError(f"row {r} has {len(row)} values for {width} columns")
    types = [_column_type(table, c) for c in range(width)]
    out = table_pb2.Table(
        name=table.name,
        columns=[
            table_pb2.Column(name=n, type=t) for n, t in zip(table.columns, types, strict=True)
        ],
    )
    for r, row in enumerate(table.rows):
        values = []
        for v, kind in zip(row, types, strict=True):
            if v is None:
                values.append(table_pb2.Value(is_null=True))
            elif kind == type_pb2.TYPE_INTEGER:
                values.append(table_pb2.Value(integer_value=int(v)))
            elif kind == type_pb2.TYPE_DOUBLE:
                values.append(table_pb2.Value(double_value=float(v)))
            else:
                values.append(table_pb2.Value(string_value=str(v)))
        out.rows.append(
            table_pb2.Row(row_id=table.row_ids[r] if table.row_ids else "", values=values)
        )
    return out


def _column_type(table: Table, c: int) -> type_pb2.Type:
    seen: set[str] = set()
    for row in table.rows:
        v = row[c]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError(f"column {table.columns[c]!r} holds a {type(v).__name__}")
        seen.add("str" if isinstance(v, str) else "int" if isinstance(v, int) else "float")
    if not seen:
        return type_pb2.TYPE_UNSPECIFIED
    if seen == {"str"}:
        return type_pb2.TYPE_STRING
    if "str" in seen:
        raise ValueError(f"column {table.columns[c]!r} mixes strings and numbers")
    return type_pb2.TYPE_INTEGER if seen == {"int"} else type_pb2.TYPE_DOUBLE


# --- the servers ------------------------------------------------------------------------


class UpiServer:
    """The model behind a gRPC server and an HTTP server for probes and metrics."""

    def __init__(self, model: UpiModel, name: str, version: str) -> None:
        self.model = model
        self.full_name = f"{name}-{version}"
        self.model_meta = upi_pb2.ModelMetadata(name=name, version=version)
        self.ready = False
        # Merlin's UPI contract: request and response messages as they are.
        self._proto = callable(getattr(model, "predict_proto", None))
        self._async = not self._proto and inspect.iscoroutinefunction(model.predict)

    async def predict_values(
        self, request: upi_pb2.PredictValuesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> upi_pb2.PredictValuesResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._answer(request, context)
        except _Abort as abort:
            code = abort.code
            await context.abort(abort.code, abort.message)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            REQUESTS.labels(code.name).inc()
            LATENCY.observe(time.perf_counter() - started)

    async def _answer(
        self, request: upi_pb2.PredictValuesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> upi_pb2.PredictValuesResponse:
        if not self.ready:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self._proto:
            return await self._answer_proto(request, context)
        if not request.HasField("prediction_table"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "prediction_table is missing")
        try:
            table = table_from_proto(request.prediction_table)
        except BadInput as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prediction_table: {exc}") from None
        try:
            result = await self._predict(table, context.time_remaining())
        except TimeoutError:
            raise _Abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the model ran past the deadline"
            ) from None
        except BadInput as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except Exception as exc:
            log.exception("predict failed")
            raise _Abort(
                grpc.StatusCode.INTERNAL, f"the model failed: {type(exc).__name__}: {exc}"
            ) from None
        if not result.row_ids and len(result.rows) == len(table.rows):
            result.row_ids = table.row_ids
        try:
            out = table_to_proto(result)
        except ValueError as exc:
            log.error("predict returned an invalid table: %s", exc)
            raise _Abort(
                grpc.StatusCode.INTERNAL, f"the model returned an invalid table: {exc}"
            ) from None
        return upi_pb2.PredictValuesResponse(
            prediction_result_table=out,
            target_name=request.target_name,
            metadata=upi_pb2.ResponseMetadata(
                prediction_id=request.metadata.prediction_id, models=[self.model_meta]
            ),
        )

    async def _answer_proto(
        self, request: upi_pb2.PredictValuesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> upi_pb2.PredictValuesResponse:
        predict = self.model.predict_proto  # type: ignore[attr-defined]
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(predict, request, context), timeout=context.time_remaining()
            )
        except TimeoutError:
            raise _Abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the model ran past the deadline"
            ) from None
        except Exception as exc:
            log.exception("upiv1_infer failed")
            raise _Abort(
                grpc.StatusCode.INTERNAL, f"the model failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(result, upi_pb2.PredictValuesResponse):
            raise _Abort(grpc.StatusCode.INTERNAL, "upiv1_infer returned "
                         f"{type(result).__name__}, not a PredictValuesResponse")  # fmt: skip
        return result

    async def _predict(self, table: Table, remaining: float | None) -> Table:
        if self._async:
            call: Awaitable[Any] = self.model.predict(table)  # type: ignore[assignment]
        else:
            call = asyncio.to_thread(self.model.predict, table)
        # Past the caller's deadline nobody is listening: stop waiting (a sync model's
        # thread runs on; its result is dropped).
        result: Table = await asyncio.wait_for(call, timeout=remaining)
        return result

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "PredictValues": grpc.unary_unary_rpc_method_handler(
                    self.predict_values,
                    request_deserializer=upi_pb2.PredictValuesRequest.FromString,
                    response_serializer=upi_pb2.PredictValuesResponse.SerializeToString,
                )
            },
        )

    def http_app(self) -> web.Application:
        async def ready(_: web.Request) -> web.Response:
            return web.json_response(
                {"name": self.full_name, "ready": self.ready}, status=200 if self.ready else 503
            )

        async def alive(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get(f"/v1/models/{self.full_name}", ready)
        app.router.add_get("/", alive)
        app.router.add_get("/metrics", metrics)
        return app

    async def load(self) -> None:
        try:
            await asyncio.to_thread(self.model.load)
        except Exception:
            log.exception("load failed")
            # A model that can't load will never serve: exit so the runtime reports it.
            os._exit(3)
        self.ready = True
        log.info("model %s loaded", self.full_name)


def ports_from_env(env: dict[str, str]) -> tuple[int, int | None]:
    """(gRPC port, HTTP port or None) from the replica contract's variables."""
    try:
        grpc_port = int(env.get("CARAML_GRPC_PORT") or env["CARAML_HTTP_PORT"])
        http = env.get("CARAML_HTTP_PORT") if env.get("CARAML_GRPC_PORT") else None
        http_port = int(http) if http else None
    except KeyError:
        raise SystemExit(
            "upi model server: CARAML_GRPC_PORT (or CARAML_HTTP_PORT) is missing"
        ) from None
    except ValueError as exc:
        raise SystemExit(f"upi model server: a port is not a number: {exc}") from None
    return grpc_port, (None if http_port == grpc_port else http_port)


async def run(server: UpiServer, grpc_port: int, http_port: int | None) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls for up to 10 s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    rpc = grpc.aio.server(handlers=[server.grpc_handler()], options=options)
    host = bind_host()
    if rpc.add_insecure_port(f"{host}:{grpc_port}") == 0:
        raise SystemExit(f"upi model server: cannot listen on gRPC port {grpc_port}")
    await rpc.start()
    runner: web.AppRunner | None = None
    if http_port is not None:
        runner = web.AppRunner(server.http_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, http_port).start()
    else:
        log.warning("no CARAML_HTTP_PORT beside CARAML_GRPC_PORT: no HTTP probes or metrics")
    log.info("UPI server for %s: gRPC on %d, HTTP on %s", server.full_name, grpc_port, http_port)
    loader = asyncio.create_task(server.load())
    await stop.wait()
    server.ready = False  # readiness fails while draining
    await rpc.stop(grace=10)
    if runner is not None:
        await runner.cleanup()
    loader.cancel()


def serve(model: UpiModel, env: dict[str, str] | None = None) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    env = dict(os.environ) if env is None else env
    grpc_port, http_port = ports_from_env(env)
    name = env.get("CARAML_MODEL_NAME", "")
    version = env.get("CARAML_MODEL_VERSION", "")
    if not name or not version:
        full = env.get("CARAML_MODEL_FULL_NAME", "")
        name, _, version = full.rpartition("-") if full else ("", "", "")
    if not name:
        raise SystemExit("upi model server: CARAML_MODEL_NAME and CARAML_MODEL_VERSION are missing")
    server = UpiServer(model, name, version)
    if env.get("CARAML_MODEL_FULL_NAME"):
        server.full_name = env["CARAML_MODEL_FULL_NAME"]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(server, grpc_port, http_port))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m merlin_dp.servers.upi module:Class")
    model_dir = os.environ.get("CARAML_ARTIFACT_LOCATION", "")
    model = load_class(args[0], model_dir)
    if answers_upi(model):  # Merlin's contract: initialize(artifacts), upiv1_infer
        serve(MerlinUpiModel(model, artifacts_in(model_dir)))  # type: ignore[arg-type]
        return
    require_contract(model, args[0], "upi", "load() and predict(table)",
                     "initialize(artifacts) and upiv1_infer(request, context)")  # fmt: skip
    serve(model)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the user's model builds its results
    # with merlin_dp.servers.upi.Table, and that is the class the server checks for.
    from merlin_dp.servers import upi

    upi.main()
