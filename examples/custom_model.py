"""A minimal custom model under Merlin's replica contract.

It reads CARAML_HTTP_PORT and CARAML_MODEL_FULL_NAME, serves
POST /v1/models/<full name>:predict, readiness GET /v1/models/<full name> and
liveness GET /. Its "model" scores each instance by the sum of its features, scaled
by a per-version factor so two versions answer differently.

    CARAML_HTTP_PORT=9001 CARAML_MODEL_FULL_NAME=scorer-1 python examples/custom_model.py
"""

from __future__ import annotations

import os

from aiohttp import web


def make_app(full_name: str, factor: float) -> web.Application:
    async def predict(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            instances = payload["instances"]
            predictions = [round(sum(map(float, row)) * factor, 4) for row in instances]
        except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
            return web.json_response(
                {"error": f'expected {{"instances": [[numbers]]}}: {exc}'}, status=400
            )
        return web.json_response({"predictions": predictions, "model": full_name})

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"name": full_name, "ready": True})

    async def alive(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    app.router.add_post(f"/v1/models/{full_name}:predict", predict)
    app.router.add_get(f"/v1/models/{full_name}", ready)
    app.router.add_get("/", alive)
    return app


def main() -> None:
    port = int(os.environ["CARAML_HTTP_PORT"])
    full_name = os.environ["CARAML_MODEL_FULL_NAME"]
    factor = float(os.environ.get("CARAML_MODEL_VERSION", "1"))
    web.run_app(make_app(full_name, factor), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
