"""The replica contract, served: what every shipped model server has in common.

Routes (Merlin's custom model contract): ``POST /v1/models/{full name}:predict``,
readiness ``GET /v1/models/{full name}`` (503 until the model has loaded), liveness
``GET /``, Prometheus ``GET /metrics`` (request counts and latency, and the process's
CPU and memory, which the autoscaler reads). Settings come from the environment the
runtime sets: ``CARAML_HTTP_PORT``, ``CARAML_MODEL_FULL_NAME``, ``CARAML_ARTIFACT_LOCATION``,
and ``CARAML_BIND_HOST`` (where to listen: 127.0.0.1 unless set — a pod sets 0.0.0.0 so
its probes and the gateways can reach it).

A model is anything with ``load()`` and ``predict(payload)``; ``predict`` may be
``async``. A sync ``predict`` runs in a worker thread so probes stay answered while it
works; ``load`` runs before the server reports ready.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

log = logging.getLogger("model")

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


def make_app(model: Model, full_name: str) -> web.Application:
    state = {"ready": False, "error": ""}
    is_async = inspect.iscoroutinefunction(model.predict)

    async def predict(request: web.Request) -> web.Response:
        started = time.perf_counter()
        status = 200
        try:
            if not state["ready"]:
                status = 503
                return _error(503, "the model is still loading")
            try:
                payload = json.loads(await request.read())
            except ValueError as exc:
                status = 400
                return _error(400, f"the body is not JSON: {exc}")
            try:
                if is_async:
                    result = await model.predict(payload)
                else:
                    result = await asyncio.to_thread(model.predict, payload)
            except BadInput as exc:
                status = 400
                return _error(400, str(exc))
            except Exception as exc:
                status = 500
                log.exception("predict failed")
                return _error(500, f"the model failed: {type(exc).__name__}: {exc}")
            return web.json_response(result)
        finally:
            REQUESTS.labels(str(status)).inc()
            LATENCY.observe(time.perf_counter() - started)

    async def ready(_: web.Request) -> web.Response:
        if state["ready"]:
            return web.json_response({"name": full_name, "ready": True})
        return web.json_response({"name": full_name, "ready": False, "error": state["error"]},
                                 status=503)  # fmt: skip

    async def alive(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

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

        app["loader"] = asyncio.create_task(run())

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(f"/v1/models/{full_name}:predict", predict)
    app.router.add_get(f"/v1/models/{full_name}", ready)
    app.router.add_get("/", alive)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(load)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
    web.run_app(make_app(model, full_name), host=bind_host(), port=port, print=None,
                access_log=None, shutdown_timeout=10, loop=uvloop.new_event_loop())  # fmt: skip
