"""A replica for tests: a real HTTP server, run as its own process or on a test's loop.

It honours the replica contract's paths (predict, readiness, liveness) and adds a few
test hooks: echo the request, answer with a chosen status, sleep, stream a large body,
stream the request body back.

    python -m tests.upstream_app --port 9001 --name scorer-1
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


def make_app(name: str) -> web.Application:
    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "served_by": name,
                "model": request.match_info["model"],
                "path": request.path_qs,
                "method": request.method,
                "body_bytes": len(body),
                "headers": {k: v for k, v in request.headers.items()},
            }
        )

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"name": name, "ready": True})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        await request.read()
        return web.json_response({"served_by": name, "status": code}, status=code)

    busy = {"now": 0, "peak": 0}  # /sleep requests in progress, and the most at once

    async def sleep(request: web.Request) -> web.Response:
        busy["now"] += 1
        busy["peak"] = max(busy["peak"], busy["now"])
        try:
            await asyncio.sleep(float(request.query.get("s", "1")))
        finally:
            busy["now"] -= 1
        return web.json_response({"served_by": name, "slept": True})

    async def peak(_: web.Request) -> web.Response:
        return web.json_response({"served_by": name, **busy})

    async def big(request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "1048576"))
        resp = web.StreamResponse(headers={"X-Served-By": name})
        if request.query.get("length") == "1":
            resp.content_length = total
        await resp.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            await resp.write(block[:n])
            sent += n
        await resp.write_eof()
        return resp

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"X-Served-By": name})
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def count(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"served_by": name, "received": total})

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"served_by": name, "path": request.path_qs, "method": request.method,
             "headers": {k: v for k, v in request.headers.items()}}
        )  # fmt: skip

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/v1/models/{model}:predict", predict)
    app.router.add_get("/v1/models/{model}", ready)
    app.router.add_get("/", live)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/sleep", sleep)
    app.router.add_get("/peak", peak)
    app.router.add_get("/big", big)
    app.router.add_post("/echo", echo)
    app.router.add_post("/count", count)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="replica")
    args = parser.parse_args()
    print(json.dumps({"listening": args.port}), flush=True)
    web.run_app(make_app(args.name), host="127.0.0.1", port=args.port, print=None,
                access_log=None)  # fmt: skip


if __name__ == "__main__":
    main()
