"""The replica contract, served: what every shipped model server has in common.

Routes (Merlin's custom model contract, which is KServe's V1): ``POST /v1/models/{full
name}:predict``, readiness ``GET /v1/models/{full name}`` (503 until the model has
loaded), liveness ``GET /`` (``{"status": "alive"}``, as KServe answers), Prometheus
``GET /metrics`` (request counts and latency, and the process's CPU and memory, which the
autoscaler reads). Beside them, KServe V2 / the Open Inference Protocol
(:mod:`merlin_dp.servers.v2` maps its tensors to ``predict``): ``GET /v2/health/live``,
``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/{full name}[/ready]`` and
``POST /v2/models/{full name}/infer``. Settings come from the environment the runtime
sets: ``CARAML_HTTP_PORT``, ``CARAML_MODEL_NAME``, ``CARAML_MODEL_FULL_NAME``,
``CARAML_ARTIFACT_LOCATION``, and ``CARAML_BIND_HOST`` (where to listen: 127.0.0.1 unless
set — a pod sets 0.0.0.0 so its probes and the gateways can reach it).

A model is anything with ``load()`` and ``predict(payload)``; ``predict`` may be
``async``, and gets ``headers=`` (the request's) too when the model sets
``takes_headers``. A sync ``predict`` runs in a worker thread so probes stay answered
while it works; ``load`` runs before the server reports ready.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from merlin_dp.servers import v2

# Holds the load task, so it isn't collected while it runs.
LOADER: web.AppKey[asyncio.Task[None]] = web.AppKey("loader")

log = logging.getLogger("model")

try:
    SERVER_VERSION = package_version("merlin-dataplane")
except PackageNotFoundError:  # run from a source tree that was never installed
    SERVER_VERSION = "0+unknown"

REQUESTS = Counter("merlin_model_requests", "Predictions answered, by status.", ["code"])
LATENCY = Histogram(
    "merlin_model_request_duration_seconds",
    "Time spent answering a prediction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class Model(Protocol):
    def load(self) -> None: ...

    def predict(self, payload: Any) -> Any: ...


class BadInput(ValueError):
    """The payload is not what the model takes: the caller gets 400 with this message."""


def make_app(model: Model, full_name: str, model_name: str | None = None) -> web.Application:
    """The contract's routes for ``model``, served as ``full_name`` (``<model>-<version>``).

    ``model_name`` (the stable name; ``full_name`` if not given) is the name V2 answers use.
    """
    state = {"ready": False, "error": ""}
    is_async = inspect.iscoroutinefunction(model.predict)
    # Merlin's contract hands the model the request's headers (merlin_contract).
    takes_headers = bool(getattr(model, "takes_headers", False))
    stable_name = model_name or full_name

    async def call_model(payload: Any, request: web.Request) -> Any:
        predict: Callable[..., Any] = model.predict
        if takes_headers:
            predict = functools.partial(predict, headers=dict(request.headers))
        try:
            if is_async:
                return await predict(payload)
            return await asyncio.to_thread(predict, payload)
        except BadInput as exc:
            raise _Refusal(400, str(exc)) from None
        except Exception as exc:
            log.exception("predict failed")
            raise _Refusal(500, f"the model failed: {type(exc).__name__}: {exc}") from None

    def counted(
        handler: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A prediction route: 503 until loaded, refusals as JSON errors, metrics."""

        async def measured(request: web.Request) -> web.Response:
            started = time.perf_counter()
            status = 499  # the client left before an answer was made
            try:
                try:
                    if not state["ready"]:
                        raise _Refusal(503, "the model is still loading")
                    resp = await handler(request)
                except _Refusal as refusal:
                    resp = _error(refusal.status, refusal.message)
                status = resp.status
                return resp
            finally:
                REQUESTS.labels(str(status)).inc()
                LATENCY.observe(time.perf_counter() - started)

        return measured

    async def predict(request: web.Request) -> web.Response:
        try:
            payload = json.loads(await request.read())
        except ValueError as exc:
            raise _Refusal(400, f"the body is not JSON: {exc}") from None
        return web.json_response(await call_model(payload, request))

    async def infer(request: web.Request) -> web.Response:
        try:
            call = v2.decode_request(await request.read(), request.headers.get(v2.HEADER_LENGTH))
            payload = call.payload()
        except v2.InvalidTensor as exc:
            raise _Refusal(400, str(exc)) from None
        result = await call_model(payload, request)
        try:
            body, headers = v2.encode_response(stable_name, call, result)
        except v2.InvalidTensor as exc:
            raise _Refusal(400, str(exc)) from None
        except v2.UnencodableAnswer as exc:
            log.error("predict's answer is not V2 tensors: %s", exc)
            raise _Refusal(500, f"the model's answer is not tensors: {exc}") from None
        return web.Response(body=body, headers=headers)

    def readiness(name: str) -> web.Response:
        if state["ready"]:
            return web.json_response({"name": name, "ready": True})
        return web.json_response({"name": name, "ready": False, "error": state["error"]},
                                 status=503)  # fmt: skip

    async def ready(_: web.Request) -> web.Response:
        return readiness(full_name)

    async def alive(_: web.Request) -> web.Response:
        # KServe's shape: its V1 client's is_server_live reads "status".
        return web.json_response({"status": "alive"})

    async def v2_live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def v2_ready(_: web.Request) -> web.Response:
        # One model per server: the server is ready when its model is.
        if state["ready"]:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "error": "the model is still loading"},
                                 status=503)  # fmt: skip

    async def v2_server(_: web.Request) -> web.Response:
        return web.json_response(
            {"name": "merlin-dataplane", "version": SERVER_VERSION,
             "extensions": ["binary_tensor_data"]}
        )  # fmt: skip

    async def v2_model(_: web.Request) -> web.Response:
        # The model's signature is not known to the server: no tensors listed, as
        # KServe's own servers answer by default.
        return web.json_response({"name": stable_name, "platform": "", "inputs": [], "outputs": []})

    async def v2_model_ready(_: web.Request) -> web.Response:
        return readiness(stable_name)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})  # fmt: skip

    async def load(app: web.Application) -> None:
        async def run() -> None:
            try:
                await asyncio.to_thread(model.load)
            except Exception as exc:
                state["error"] = f"{type(exc).__name__}: {exc}"
                log.exception("load failed")
                # A model that can't load will never serve: exit so the runtime reports it.
                os._exit(3)
            state["ready"] = True
            log.info("model %s loaded", full_name)

        app[LOADER] = asyncio.create_task(run())

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(f"/v1/models/{full_name}:predict", counted(predict))
    app.router.add_get(f"/v1/models/{full_name}", ready)
    app.router.add_get("/", alive)
    app.router.add_get("/v2/health/live", v2_live)
    app.router.add_get("/v2/health/ready", v2_ready)
    app.router.add_get("/v2", v2_server)
    app.router.add_get(f"/v2/models/{full_name}", v2_model)
    app.router.add_get(f"/v2/models/{full_name}/ready", v2_model_ready)
    app.router.add_post(f"/v2/models/{full_name}/infer", counted(infer))
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(load)
    return app


class _Refusal(Exception):
    """An error answer decided deep in a prediction handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    # Exactly "application/json" (no charset), as KServe answers: KServe's client shows
    # the error text only for that content type.
    body = json.dumps({"error": message}).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def bind_host() -> str:
    """Where a replica listens: loopback for the local runtime, any interface in a pod."""
    return os.environ.get("CARAML_BIND_HOST") or "127.0.0.1"


def serve(model: Model) -> None:
    """Run ``model`` under the contract, with settings from the runtime's environment."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        port = int(os.environ["CARAML_HTTP_PORT"])
        full_name = os.environ["CARAML_MODEL_FULL_NAME"]
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"model server: the replica contract's {exc} is missing") from None
    app = make_app(model, full_name, os.environ.get("CARAML_MODEL_NAME"))
    web.run_app(app, host=bind_host(), port=port, print=None,
                access_log=None, shutdown_timeout=10, loop=uvloop.new_event_loop())  # fmt: skip
