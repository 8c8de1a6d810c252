"""Traffic strategies through a real gateway: split, match, sticky, shadow."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web

from merlin_dp.gateway.exposition import render
from tests.conftest import Replica, model_endpoint, start_replicas, version


def endpoints(
    v1: str, v2: str, weights: dict[str, int], revision: int = 0, **rule: Any
) -> dict[str, Any]:
    return {
        "revision": revision,
        "version_endpoints": [
            version("fraud", "scorer", "1", [v1]),
            version("fraud", "scorer", "2", [v2]),
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", weights, **rule)],
    }


async def served(
    gw: Any, n: int, headers: dict[str, str] | None = None, concurrency: int = 32
) -> Counter[str]:
    seen: Counter[str] = Counter()
    queue = iter(range(n))

    async def client() -> None:
        for _ in queue:
            async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict",
                                  headers=headers or {}, data=b"{}") as resp:  # fmt: skip
                assert resp.status == 200
                await resp.read()
                seen[resp.headers["X-Model-Version"]] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return seen


async def test_canary_split_is_accurate(gateway_factory: Any, replicas: Any) -> None:
    a, b = await start_replicas(replicas, "a", "b")
    gw = await gateway_factory(endpoints(a.address, b.address, {"1": 90, "2": 10}))
    seen = await served(gw, 10_000)
    assert abs(seen["2"] / 10_000 - 0.10) <= 0.02, seen


async def test_header_matches_come_first_in_order(gateway_factory: Any, replicas: Any) -> None:
    a, b = await start_replicas(replicas, "a", "b")
    rule: dict[str, Any] = {
        "match": [
            {"header": "X-Model-Version", "exact": "2", "version": "2"},
            {"header": "X-Tenant", "regex": "^beta-", "version": "2"},
            {"header": "X-Tenant", "regex": "^beta-gold", "version": "1"},  # shadowed by rule 2
        ],
        "sticky": {"header": "X-User"},
    }
    gw = await gateway_factory(endpoints(a.address, b.address, {"1": 100, "2": 0}, **rule))
    assert await served(gw, 20, {"X-Model-Version": "2"}) == Counter({"2": 20})
    assert await served(gw, 20, {"X-Tenant": "beta-gold-7"}) == Counter({"2": 20})
    assert await served(gw, 20, {"X-Tenant": "alpha"}) == Counter({"1": 20})
    # A match beats the sticky key.
    assert await served(gw, 20, {"X-User": "u1", "X-Model-Version": "2"}) == Counter({"2": 20})
    snap = gw.worker.metrics.snapshot()
    by: Counter[tuple[str, str]] = Counter()
    for v in snap["versions"]:
        for sr in v["series"]:
            by[(v["version"], sr["chosen_by"])] += sr["count"]
    assert by[("2", "match")] == 60
    assert by[("1", "sticky")] + by[("1", "weight")] == 20
    text = render(snap).decode()
    assert 'chosen_by="match"' in text


async def test_sticky_callers_stay_and_only_the_moved_share_moves(
    gateway_factory: Any, replicas: Any
) -> None:
    a, b = await start_replicas(replicas, "a", "b")
    rule: dict[str, Any] = {"sticky": {"header": "X-User"}}
    gw = await gateway_factory(endpoints(a.address, b.address, {"1": 90, "2": 10}, **rule))
    users = [f"user-{i}" for i in range(1000)]

    async def placement() -> dict[str, str]:
        out: dict[str, str] = {}
        sem = asyncio.Semaphore(32)

        async def one(user: str) -> None:
            async with sem, gw.request("POST", "scorer.fraud.localhost", "/v1/predict",
                                       headers={"X-User": user}) as resp:  # fmt: skip
                out[user] = resp.headers["X-Model-Version"]

        await asyncio.gather(*(one(u) for u in users))
        return out

    first = await placement()
    assert await placement() == first  # weights unchanged: nobody moves
    share_v2 = sum(1 for v in first.values() if v == "2") / len(users)
    assert abs(share_v2 - 0.10) < 0.04
    await gw.set_routes(endpoints(a.address, b.address, {"1": 70, "2": 30}, revision=1, **rule))
    second = await placement()
    moved = [u for u in users if first[u] != second[u]]
    assert all(first[u] == "1" and second[u] == "2" for u in moved)  # only 1 → 2
    assert abs(len(moved) / len(users) - 0.20) < 0.04, len(moved)


async def test_sticky_cookie(gateway_factory: Any, replicas: Any) -> None:
    a, b = await start_replicas(replicas, "a", "b")
    rule: dict[str, Any] = {"sticky": {"cookie": "session"}}
    gw = await gateway_factory(endpoints(a.address, b.address, {"1": 50, "2": 50}, **rule))
    for user in ("alice", "bob", "carol", "dave"):
        seen = await served(gw, 10, {"Cookie": f"theme=dark; session={user}"}, concurrency=2)
        assert len(seen) == 1, seen


def crafted_app(name: str, disagree: bool) -> web.Application:
    """Answers {"score": n} for body {"n": n}. The candidate ("disagree") differs on
    purpose: within tolerance for n % 2 == 0, a different body for n % 5 == 0, a 500
    for n % 7 == 0 (status wins over body when both apply)."""

    async def predict(request: web.Request) -> web.Response:
        n = (await request.json())["n"]
        if disagree and n % 7 == 0:
            return web.json_response({"error": "boom"}, status=500)
        score: float = n * 1.5
        if disagree and n % 5 == 0:
            score += 1
        elif disagree and n % 2 == 0:
            score *= 1 + 1e-9
        # Same content, keys in another order: must not count as a mismatch.
        if disagree:
            return web.json_response({"meta": {"model": "scorer"}, "score": score})
        return web.json_response({"score": score, "meta": {"model": "scorer"}})

    app = web.Application()
    app.router.add_post("/v1/models/{m}:predict", predict)
    return app


async def wait_compared(gw: Any, n: int) -> dict[str, Any]:
    for _ in range(500):
        shadows = gw.worker.metrics.snapshot()["shadows"]
        if shadows and shadows[0]["compared"] >= n:
            return dict(shadows[0])
        await asyncio.sleep(0.01)
    raise AssertionError(gw.worker.metrics.snapshot()["shadows"])


async def test_shadow_mismatches_are_counted_exactly(gateway_factory: Any, replicas: Any) -> None:
    prod = await Replica("prod", crafted_app("prod", False)).start()
    cand = await Replica("cand", crafted_app("cand", True)).start()
    replicas += [prod, cand]
    rule: dict[str, Any] = {"mirror": {"version": "2", "percent": 100, "relative_tolerance": 1e-6}}
    gw = await gateway_factory(endpoints(prod.address, cand.address, {"1": 100, "2": 0}, **rule))
    n_requests = 140
    for n in range(n_requests):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict",
                              data=json.dumps({"n": n})) as resp:  # fmt: skip
            assert resp.status == 200
            assert resp.headers["X-Model-Version"] == "1"
            assert (await resp.json())["score"] == n * 1.5
    shadow = await wait_compared(gw, n_requests)
    status_mismatch = sum(1 for n in range(n_requests) if n % 7 == 0)
    body_mismatch = sum(1 for n in range(n_requests) if n % 5 == 0 and n % 7 != 0)
    assert shadow["mismatch"] == {"status": status_mismatch, "body": body_mismatch}
    assert shadow["results"] == {"sent|": n_requests}
    assert shadow["count"] == n_requests  # shadow latency observed for each


async def test_shadow_comparisons_reach_the_signals_rollouts_read(
    gateway_factory: Any, replicas: Any
) -> None:
    """Per second, the mirrored version's copies (answered, server errors, latency) and
    its compared pairs: a pair where either side erred is an error, not a comparison."""
    prod = await Replica("prod", crafted_app("prod", False)).start()
    cand = await Replica("cand", crafted_app("cand", True)).start()
    replicas += [prod, cand]
    rule: dict[str, Any] = {"mirror": {"version": "2", "percent": 100}}
    gw = await gateway_factory(endpoints(prod.address, cand.address, {"1": 100, "2": 0}, **rule))
    n_requests = 140
    for n in range(n_requests):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict",
                              data=json.dumps({"n": n})) as resp:  # fmt: skip
            await resp.read()
    await wait_compared(gw, n_requests)
    await asyncio.sleep(1.2)  # the recorder closes the last second
    records = gw.worker.signals.since(0)

    def total(version: str, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in records if r["version"] == version)

    failed = sum(1 for n in range(n_requests) if n % 7 == 0)
    differed = sum(1 for n in range(n_requests) if n % 5 == 0 and n % 7 != 0)
    assert (total("1", "answered"), total("1", "errors")) == (n_requests, 0)
    assert sum(sum(r.get("latency", [])) for r in records if r["version"] == "1") == n_requests
    assert total("2", "answered") == 0  # no caller was served by the shadow
    assert (total("2", "shadow_answered"), total("2", "shadow_errors")) == (n_requests, failed)
    assert total("2", "compared") == n_requests - failed
    assert total("2", "differed") == differed


async def test_slow_or_failing_shadow_leaves_primary_untouched(
    gateway_factory: Any, replicas: Any
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"late": True}, status=500)

    app = web.Application()
    app.router.add_post("/v1/models/{m}:predict", hang)
    slow = await Replica("slow", app).start()
    replicas.append(slow)
    (prod,) = await start_replicas(replicas, "prod")
    rule: dict[str, Any] = {"mirror": {"version": "2", "percent": 100}}
    gw = await gateway_factory(endpoints(prod.address, slow.address, {"1": 100, "2": 0}, **rule))
    statuses: Counter[int] = Counter()
    for _ in range(20):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", data=b"{}") as resp:
            statuses[resp.status] += 1
            await resp.read()
    # Every primary answered while its shadow copy was still hanging.
    assert statuses == Counter({200: 20})
    assert gw.worker.proxy.mirroring.in_flight == 20
    release.set()
    shadow = await wait_compared(gw, 20)
    assert shadow["mismatch"]["status"] == 20


async def test_shadow_bounds_drop_and_count(gateway_factory: Any, replicas: Any) -> None:
    from merlin_dp.gateway.config import GatewayConfig
    from merlin_dp.gateway.http.proxy import ProxyLimits

    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/models/{m}:predict", hang)
    slow = await Replica("slow", app).start()
    replicas.append(slow)
    (prod,) = await start_replicas(replicas, "prod")
    rule: dict[str, Any] = {"mirror": {"version": "2", "percent": 100}}
    config = GatewayConfig(proxy=ProxyLimits(buffer_body_bytes=1000))
    gw = await gateway_factory(endpoints(prod.address, slow.address, {"1": 100, "2": 0}, **rule),
                               config)  # fmt: skip
    gw.worker.proxy.mirroring.limits = type(gw.worker.proxy.mirroring.limits)(max_in_flight=3)
    for _ in range(5):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", data=b"{}") as resp:
            assert resp.status == 200
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict",
                          data=b"x" * 5000) as resp:  # fmt: skip
        assert resp.status == 200  # streamed primary; its copy is dropped
    results = gw.worker.metrics.snapshot()["shadows"][0]["results"]
    assert results == {"dropped|concurrency": 2, "dropped|body_too_large": 1}
    release.set()


def test_v2_answers_agree_whatever_model_gave_them() -> None:
    """KServe V2 answers name their model and version: not a difference of prediction."""
    from merlin_dp.gateway.mirror import bodies_agree

    def v2(name: str, version: str, value: float) -> bytes:
        return json.dumps({"model_name": name, "model_version": version, "id": "7",
                           "outputs": [{"name": "p", "shape": [1], "datatype": "FP64",
                                        "data": [value]}]}).encode()  # fmt: skip

    assert bodies_agree(v2("scorer-1", "1", 0.5), v2("scorer-2", "2", 0.5), 1e-6)
    assert not bodies_agree(v2("scorer-1", "1", 0.5), v2("scorer-2", "2", 0.6), 1e-6)
    # Elsewhere a model's name is part of its answer.
    assert not bodies_agree(b'{"model": "scorer-1", "predictions": [1]}',
                            b'{"model": "scorer-2", "predictions": [1]}', 1e-6)  # fmt: skip
