"""The version queue's own cost, ``python -m loadtests.bench queue``: what choosing a
replica under ``container_concurrency``, waiting in the version's FIFO and handing a slot
on cost per request, without sockets.

``bench http --container-concurrency N`` measures the whole gateway with a limit; when
the limit binds, its figure also holds what a limit does by design — fewer requests on
the replica at once, so fewer per event-loop turn to share the turn's fixed cost. This
one isolates the code: ``--tasks`` coroutines each take a slot (or wait for one), yield
to the loop once (the exchange), and give the slot back, on the real ``Activator``,
``VersionQueue``, route table and balancer, on uvloop. Ends with
``RESULT queue unlimited_us=<x> nonbinding_us=<x> binding_us=<x>``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from merlin_dp.gateway.activation import ActivationLimits, Activator
from merlin_dp.gateway.metrics import GatewayMetrics
from merlin_dp.gateway.pool.upstream import PoolLimits, UpstreamRegistry
from merlin_dp.gateway.routing.balancer import choose, choose_free
from merlin_dp.gateway.routing.table import compile_table
from merlin_dp.spec.routes import RouteTableSpec


async def per_request_us(limit: int, tasks: int, requests: int) -> float:
    """Microseconds per request through slot choice, the queue and release."""
    loop = asyncio.get_running_loop()
    registry = UpstreamRegistry(loop, PoolLimits())
    metrics = GatewayMetrics(registry.stats)
    spec = RouteTableSpec.model_validate({"version_endpoints": [
        {"project": "p", "model": "m", "version": "1", "replicas": ["127.0.0.1:1"],
         "container_concurrency": limit},
    ]})  # fmt: skip
    table = compile_table(spec, "localhost", registry, metrics.version)
    activator = Activator(metrics, ActivationLimits(max_waiting=tasks))
    activator.table_swapped(table)
    version = table.by_key[("p", "m", "1")]
    each = max(1, requests // tasks)

    async def client() -> None:
        for _ in range(each):
            if not version.limit:
                up = choose(version.upstreams)
                assert up is not None
                up.outstanding += 1
            else:
                found = choose_free(version.upstreams, version.limit)
                if found is None:
                    up = await activator.wait_for_slot(version)
                else:
                    up = found
                    up.outstanding += 1
            await asyncio.sleep(0)  # the exchange
            up.release()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(tasks)))
    return (time.perf_counter() - began) / (each * tasks) * 1e6


def run(args: argparse.Namespace) -> int:
    tasks, requests = args.tasks, args.requests
    cases = (("unlimited", 0), ("nonbinding", 1000), ("binding", max(1, tasks // 8)))
    figures: dict[str, float] = {}
    print(f"bench queue: {tasks} concurrent requests, {requests} in all, uvloop")
    for name, limit in cases:
        best = min(uvloop.run(per_request_us(limit, tasks, requests)) for _ in range(3))
        figures[name] = best
        print(f"{name:<11} limit={limit:<5} {best:6.2f} µs/request (best of 3)")
    print(
        f"RESULT queue unlimited_us={figures['unlimited']:.2f} "
        f"nonbinding_us={figures['nonbinding']:.2f} binding_us={figures['binding']:.2f}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "queue",
        help="the version queue's own cost per request, without sockets",
        description=(
            "Slot choice, waiting in the version's FIFO and handing slots on, per request, "
            "with no limit, a limit that never binds, and one that makes 7 of 8 requests "
            "wait. Ends with: RESULT queue unlimited_us=<x> nonbinding_us=<x> binding_us=<x>"
        ),
    )
    parser.add_argument("--tasks", type=int, default=64,
                        help="concurrent requests (default: %(default)s)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=640_000,
                        help="requests in all (default: %(default)s)")  # fmt: skip
    parser.set_defaults(run=run)
