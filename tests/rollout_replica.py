"""A model replica for rollout tests, under the replica contract: it scores each instance
by the sum of its features (as examples/custom_model.py does) and, as its environment
says, answers every Nth request with a 500 (``ROLLOUT_FAIL_EVERY``) or every Nth with a
prediction off by one (``ROLLOUT_DIFFER_EVERY``).

    CARAML_HTTP_PORT=9001 CARAML_MODEL_FULL_NAME=scorer-2 ROLLOUT_FAIL_EVERY=20 \\
        python -m tests.rollout_replica
"""

from __future__ import annotations

import os

from aiohttp import web


def make_app(full_name: str, fail_every: int, differ_every: int) -> web.Application:
    seen = {"n": 0}

    async def predict(request: web.Request) -> web.Response:
        payload = await request.json()
        seen["n"] += 1
        n = seen["n"]
        if fail_every and n % fail_every == 0:
            return web.json_response({"error": "injected failure"}, status=500)
        predictions = [sum(map(float, row)) for row in payload["instances"]]
        if differ_every and n % differ_every == 0:
            predictions = [p + 1 for p in predictions]
        return web.json_response({"predictions": predictions})

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
    app = make_app(
        os.environ["CARAML_MODEL_FULL_NAME"],
        int(os.environ.get("ROLLOUT_FAIL_EVERY", "0")),
        int(os.environ.get("ROLLOUT_DIFFER_EVERY", "0")),
    )
    web.run_app(app, host="127.0.0.1", port=int(os.environ["CARAML_HTTP_PORT"]), print=None)


if __name__ == "__main__":
    main()
