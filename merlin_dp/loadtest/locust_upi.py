"""Locust suite: a UPI_V1 model's stable address over gRPC, the way its callers use it.

Every user calls ``caraml.upi.v1.UniversalPredictionService/PredictValues`` on the
gateway's gRPC port with ``:authority`` ``<model>.<project>.<domain>`` back to back; each
answer is named by the version that served it (the ``x-model-version`` metadata:
``predict v1``, ``predict v2``), each failure by its gRPC status (``gRPC UNAVAILABLE``).
The request table comes from ``--payload``: ``{"instances": [[…], …]}`` becomes one row
per instance with DOUBLE columns ``f0``, ``f1``, …

    locust -f merlin_dp/loadtest/locust_upi.py --host http://127.0.0.1:8082 --model fraud/rows \\
        --headless -u 16 -r 16 -t 30s --csv out/upi

or ``merlin-dp loadtest fraud/rows --suite upi --gateway http://127.0.0.1:8082``.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task

from merlin_dp.loadtest.locust_common import (
    Target,
    add_suite_arguments,
    request_from_payload,
    request_name,
)
from merlin_dp.protos.caraml.upi.v1 import upi_pb2_grpc

# Locust runs users as greenlets: grpc must cooperate with gevent, before any channel.
grpc_gevent.init_gevent()

CALL_TIMEOUT_S = 10.0


def _suite_arguments(parser: Any, **_: Any) -> None:
    add_suite_arguments(parser)


events.init_command_line_parser.add_listener(_suite_arguments)  # type: ignore[no-untyped-call]


class UpiModelUser(User):
    """One caller of the model over gRPC, closed loop (no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.target = Target.from_options(self.environment.parsed_options)
        parts = urlsplit(str(self.host))
        address = f"{parts.hostname}:{parts.port or 80}"
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.default_authority", self.target.model_host)]
        )
        self.stub = upi_pb2_grpc.UniversalPredictionServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.request = request_from_payload(self.target.payload)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        started = time.perf_counter()
        version: str | None = None
        length = 0
        error: BaseException | None = None
        try:
            response, call = self.stub.PredictValues.with_call(self.request, timeout=CALL_TIMEOUT_S)
            version = dict(call.initial_metadata()).get("x-model-version")
            length = response.ByteSize()
        except grpc.RpcError as exc:
            error = UpiFailure(failure_reason(exc))
        self.environment.events.request.fire(
            request_type="grpc",
            name=request_name("predict", version if isinstance(version, str) else None),
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )


class UpiFailure(Exception):
    """A failed call, named by its cause (Locust groups failures by the message)."""


def failure_reason(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    return f"gRPC {code.name}" if code is not None else f"connection {type(exc).__name__}"
