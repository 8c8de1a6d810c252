"""The admin port, apart from traffic: ``/metrics``, ``/signals``, ``/healthz``, ``/readyz``.

The admin app asks a :class:`WorkerReports` for one report per worker (in-process for a
single worker, over each worker's unix socket with ``--workers N``), merges their
counters and answers. Ready means every worker serves a route table; the detail says
which revision, from where, and the last table that was rejected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from merlin_dp.common.net import bind_socket
from merlin_dp.gateway.exposition import render
from merlin_dp.gateway.metrics_snapshot import merge_snapshots
from merlin_dp.gateway.worker import Report
from merlin_dp.spec.signals import SignalRecord, merge_records

WorkerReports = Callable[[], Awaitable[list[Report]]]


def admin_app(reports: WorkerReports) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        snapshot = merge_snapshots(r["metrics"] for r in await reports())
        return web.Response(
            body=render(snapshot), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def signals(request: web.Request) -> web.Response:
        """Per-version, per-second signals (:class:`SignalRecord`), summed over workers."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be a whole second"}, status=400)
        fresh: list[SignalRecord] = [
            r
            for report in await reports()
            for r in report.get("signals", [])
            if r["second"] > since
        ]
        return web.json_response({"signals": merge_records(fresh)})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        workers = await reports()
        ready = bool(workers) and all(w["ready"] for w in workers)
        detail = [{k: v for k, v in w.items() if k not in ("metrics", "signals")} for w in workers]
        return web.json_response({"ready": ready, "workers": detail}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/signals", signals)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bind_socket(host, port, reuse_port=False)
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]
