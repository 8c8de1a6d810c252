"""Replica CPU and memory for the utilization policies: quantities, scraping real
replicas over real sockets (hand-written metric text for exact rates, prometheus-client's
real process collector, a real model server process), missing data by reason, and the
autoscaler's own metrics rendered and parsed back."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from merlin_dp.autoscaler.metrics import AutoscalerMetrics, reason_label
from merlin_dp.autoscaler.resources import (
    MISSING_REASONS,
    ReplicaResources,
    Utilization,
    parse_cpu,
    parse_memory,
    parse_metrics,
)
from merlin_dp.common.net import free_port
from merlin_dp.runtime import ReplicaInfo, ReplicaState
from merlin_dp.spec.endpoints import (
    ResourceRequest,
)
from tests.conftest import Proc, Procs, Replica, wait_port

KEY = "fraud/scorer/1"
Mi = 2**20
START = 1_700_000_000.0


# --- quantities ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "cores"),
    [("500m", 0.5), ("2", 2.0), ("0.5", 0.5), ("1500m", 1.5), ("0m", 0.0), ("0.25", 0.25),
     ("10", 10.0), ("1m", 0.001)],
)  # fmt: skip
def test_parse_cpu(quantity: str, cores: float) -> None:
    assert parse_cpu(quantity) == cores


@pytest.mark.parametrize(
    ("quantity", "size"),
    [("512Mi", 512 * Mi), ("1Gi", 2**30), ("1G", 10**9), ("1000", 1000), ("1Ki", 1024),
     ("1K", 1000), ("2Ti", 2 * 2**40), ("3T", 3 * 10**12), ("5M", 5 * 10**6),
     ("1.5Gi", 1536 * Mi), ("0.5Ki", 512), ("1.0001K", 1001), ("0", 0)],
)  # fmt: skip
def test_parse_memory(quantity: str, size: int) -> None:
    assert parse_memory(quantity) == size


BAD_CPU = ["", "m", "500M", "-1", "1e3", "abc", " 1", "1 ", "0.5m", "1.", ".5", "1Gi", "1\n"]
BAD_MEMORY = ["", "Mi", "1Gb", "1gi", "1.5.5", "-1Mi", "1 Gi", "1e9", "1Pi", "1m", ".5Gi",
              "1Gi\n", "\u0661"]  # fmt: skip


@pytest.mark.parametrize("quantity", BAD_CPU)
def test_parse_cpu_rejects(quantity: str) -> None:
    with pytest.raises(ValueError, match="not a CPU quantity"):
        parse_cpu(quantity)


@pytest.mark.parametrize("quantity", BAD_MEMORY)
def test_parse_memory_rejects(quantity: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_memory(quantity)


def _api_accepts(**request: str) -> bool:
    try:
        ResourceRequest(**request)  # type: ignore[arg-type]
    except ValidationError:
        return False
    return True


def _parses(parse: Callable[[str], object], quantity: str) -> bool:
    try:
        parse(quantity)
    except ValueError:
        return False
    return True


def test_quantity_grammar_is_the_apis() -> None:
    """Whatever the controller accepts, the autoscaler can read, and nothing more."""
    cpus = ["500m", "2", "0.5", "1500m", "0", *BAD_CPU]
    memories = ["512Mi", "1Gi", "1G", "1000", "1.5Gi", "2Ti", "3T", *BAD_MEMORY]
    for q in cpus:
        assert _api_accepts(cpu_request=q) == _parses(parse_cpu, q), q
    for q in memories:
        assert _api_accepts(memory_request=q) == _parses(parse_memory, q), q


# --- replicas serving metric text the test controls --------------------------------------


@dataclass
class Served:
    """What one fake replica's /metrics answers; the test changes it between scrapes."""

    text: str | bytes = ""
    status: int = 200
    hang: bool = False
    content_type: str = "text/plain; version=0.0.4; charset=utf-8"
    hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


def process_text(cpu: float, rss: float, start: float = START) -> str:
    return (
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu!r}\n"
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "# TYPE process_resident_memory_bytes gauge\n"
        f"process_resident_memory_bytes {rss!r}\n"
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {start!r}\n"
        'merlin_model_requests_total{code="200"} 7.0\n'
    )


def metrics_app(served: Served) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        served.hits += 1
        if served.hang:
            await served.release.wait()
        body = served.text.encode() if isinstance(served.text, str) else served.text
        return web.Response(
            body=body, status=served.status, headers={"Content-Type": served.content_type}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


@pytest.fixture
async def resources() -> AsyncIterator[ReplicaResources]:
    made = ReplicaResources(timeout_s=0.5)
    yield made
    await made.close()


async def serve(into: list[Replica], served: Served) -> Replica:
    replica = await Replica("metrics", metrics_app(served)).start()
    into.append(replica)
    return replica


def info(
    rid: str, replica: Replica | str, state: ReplicaState = "ready", pid: int | None = 100
) -> ReplicaInfo:
    address = replica if isinstance(replica, str) else replica.address
    return ReplicaInfo(id=rid, address=address, state=state, pid=pid)


def missing(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in MISSING_REASONS}


async def test_cpu_and_memory_from_two_samples_exactly(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    a, b = Served(process_text(10.0, 256 * Mi)), Served(process_text(3.0, 128 * Mi))
    ready = [info("a", await serve(replicas, a)), info("b", await serve(replicas, b))]

    first = await resources.scrape(KEY, ready, "500m", "512Mi", now=100.0)
    assert first.cpu is None  # a rate needs two samples
    assert first.memory == 37.5  # mean of 50% and 25%
    assert (first.cpu_reported, first.memory_reported, first.expected) == (0, 2, 2)
    assert first.missing == missing(first_sample=2)
    assert first.complete("memory") and not first.complete("cpu")
    assert first.reported == 0

    a.text = process_text(11.0, 256 * Mi)  # 1 s of CPU in 2 s: 0.5 cores, 100% of 500m
    b.text = process_text(3.25, 64 * Mi)  # 0.125 cores: 25%
    second = await resources.scrape(KEY, ready, "500m", "512Mi", now=102.0)
    assert second.cpu == 62.5
    assert second.memory == 31.25  # 50% and 12.5%
    assert second.missing == missing()
    assert second.complete("cpu") and second.complete("memory") and second.reported == 2
    assert second.value("cpu") == 62.5 and second.value("memory") == 31.25


async def test_cpu_rate_spans_the_window(replicas: list[Replica]) -> None:
    resources = ReplicaResources(window_s=10.0)
    try:
        served = Served()
        ready = [info("a", await serve(replicas, served))]
        seen = []
        for now, cpu in [(0.0, 0.0), (5.0, 1.0), (10.0, 2.0), (15.0, 5.0), (16.0, 5.0)]:
            served.text = process_text(cpu, Mi)
            seen.append((await resources.scrape(KEY, ready, "1", "1Mi", now)).cpu)
        # 5 s: from 0; 10 s: from 0 (2/10); 15 s: from 5 ((5-1)/10); 16 s: from 5 (4/11).
        assert seen[:4] == [None, 20.0, 20.0, 40.0]
        assert seen[4] == pytest.approx(400 / 11)
    finally:
        await resources.close()


async def test_counter_reset_restarts_the_rate(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    served = Served()
    replica = await serve(replicas, served)

    async def cpu_at(now: float, cpu: float, pid: int = 100, start: float = START) -> float | None:
        served.text = process_text(cpu, Mi, start)
        u = await resources.scrape(KEY, [info("a", replica, pid=pid)], "1", "1Mi", now)
        assert u.memory == 100.0  # memory needs no history
        if u.cpu is None:
            assert u.missing == missing(first_sample=1)
        return u.cpu

    assert await cpu_at(0.0, 5.0) is None
    assert await cpu_at(1.0, 6.0) == 100.0
    assert await cpu_at(2.0, 0.5) is None  # went down: a new process behind the same id
    assert await cpu_at(4.0, 1.5) == 50.0
    assert await cpu_at(5.0, 9.0, pid=101) is None  # the runtime restarted it
    assert await cpu_at(6.0, 9.5, pid=101) == 50.0
    assert await cpu_at(7.0, 9.75, pid=101, start=START + 3) is None  # restarted, higher count
    assert await cpu_at(8.0, 10.0, pid=101, start=START + 3) == 25.0
    assert await cpu_at(8.0, 10.5, pid=101, start=START + 3) is None  # clock did not move
    assert await cpu_at(9.0, 11.0, pid=101, start=START + 3) == 50.0
    assert await cpu_at(200.0, 12.0, pid=101, start=START + 3) is None  # stale: too long a gap
    assert await cpu_at(202.0, 13.0, pid=101, start=START + 3) == 50.0


async def test_only_ready_replicas_are_scraped(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    states: list[ReplicaState] = ["starting", "unready", "draining", "stopped", "ready"]
    served = [Served(process_text(1.0, 64 * Mi)) for _ in states]
    listed = [
        info(f"r{i}", await serve(replicas, s), state)
        for i, (s, state) in enumerate(zip(served, states, strict=True))
    ]
    u = await resources.scrape(KEY, listed, "500m", "128Mi", now=1.0)
    assert [s.hits for s in served] == [0, 0, 0, 0, 1]
    assert (u.expected, u.memory_reported, u.memory) == (1, 1, 50.0)

    nothing = await resources.scrape(KEY, listed[:4], "500m", "128Mi", now=2.0)
    assert nothing == Utilization()
    assert nothing.cpu is None and nothing.expected == 0 and nothing.complete("cpu")


async def test_missing_signals_are_counted_by_reason(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    good = Served(process_text(1.0, 256 * Mi))
    hanging = Served(process_text(1.0, Mi), hang=True)
    broken = [
        Served(process_text(1.0, Mi), status=500),
        Served("process_cpu_seconds_total {oops\n"),  # malformed
        Served(b"process_cpu_seconds_total 1\n\xff\xfe"),  # not UTF-8
        Served("process_cpu_seconds_total 1.0\n"),  # no resident memory
        Served("# nothing to see\nsomething_else 3\n"),  # neither metric
        hanging,
    ]
    served = [good, *broken]
    listed = [info(f"r{i}", await serve(replicas, s)) for i, s in enumerate(served)]
    listed.append(info("gone", f"127.0.0.1:{free_port()}"))  # nothing listens there
    try:
        await resources.scrape(KEY, listed, "1", "512Mi", now=10.0)
        good.text = process_text(1.5, 256 * Mi)
        u = await resources.scrape(KEY, listed, "1", "512Mi", now=11.0)
    finally:
        hanging.release.set()
    # The good replica (50%), and the one without resident memory still gives a CPU rate
    # (idle: 0%) but counts as missing.
    assert u.cpu == 25.0 and u.memory == 50.0
    assert (u.cpu_reported, u.memory_reported, u.expected) == (2, 1, 8)
    assert u.missing == missing(unreachable=1, timeout=1, bad_status=1, malformed=2, no_metric=2)
    assert not u.complete("cpu") and not u.complete("memory")
    assert u.reported == 1


async def test_unusable_requests_are_visible(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    served = Served(process_text(1.0, 256 * Mi))
    listed = [info("a", await serve(replicas, served))]
    await resources.scrape(KEY, listed, "0", "512Mi", now=0.0)
    served.text = process_text(2.0, 256 * Mi)
    u = await resources.scrape(KEY, listed, "0", "512Mi", now=1.0)
    assert u.cpu is None and u.memory == 50.0
    assert u.missing == missing(no_request=1)
    u = await resources.scrape(KEY, listed, "1", "lots", now=2.0)
    assert u.cpu == 50.0 and u.memory is None  # the rate spans the window: 1 s of CPU in 2 s
    assert u.missing == missing(no_request=1)


@pytest.mark.parametrize(
    ("body", "content_type", "reason", "cpu"),
    [
        (b"process_cpu_seconds_total 2.5\nprocess_resident_memory_bytes 10\n", "", None, 2.5),
        (b"process_cpu_seconds_total{a=\"1\"} 9\nprocess_cpu_seconds_total 2.5\n", "", None, 2.5),
        (b"process_cpu_seconds_total NaN\n", "", "malformed", None),
        (b"process_cpu_seconds_total -1\n", "", "malformed", None),
        (b"process_resident_memory_bytes +Inf\n", "", "malformed", None),
        (b"process_cpu_seconds_total{a=\"1\",a=\"2\"} 1\n", "", "malformed", None),
        (b"\x00\x01\x02", "", "malformed", None),
        (b"", "", None, None),
        (b"# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 4.0\n# EOF\n",
         "application/openmetrics-text; version=1.0.0; charset=utf-8", None, 4.0),
        (b"process_cpu_seconds_total 4.0\n", "application/openmetrics-text", "malformed", None),
    ],
)  # fmt: skip
def test_parse_metrics_never_raises(
    body: bytes, content_type: str, reason: str | None, cpu: float | None
) -> None:
    reading = parse_metrics(body, content_type)
    assert reading.failure == reason
    assert reading.cpu_seconds == cpu


async def test_replica_state_is_forgotten(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    a, b = Served(process_text(1.0, Mi)), Served(process_text(1.0, Mi))
    ra, rb = await serve(replicas, a), await serve(replicas, b)
    await resources.scrape(KEY, [info("a", ra), info("b", rb)], "1", "1Mi", now=1.0)
    await resources.scrape("fraud/scorer/2", [info("c", ra)], "1", "1Mi", now=1.0)
    assert resources.tracked() == {KEY: {"a", "b"}, "fraud/scorer/2": {"c"}}
    # b left the list: forgotten, even though a later scrape lists it again as unready.
    await resources.scrape(KEY, [info("a", ra)], "1", "1Mi", now=2.0)
    assert resources.tracked()[KEY] == {"a"}
    await resources.scrape(KEY, [info("a", ra), info("b", rb, "starting")], "1", "1Mi", 3.0)
    assert resources.tracked()[KEY] == {"a"}
    resources.retain([KEY])
    assert resources.tracked() == {KEY: {"a"}}
    await resources.scrape(KEY, [], "1", "1Mi", now=4.0)
    assert resources.tracked() == {}
    # A session closed and used again is made anew.
    await resources.close()
    u = await resources.scrape(KEY, [info("a", ra)], "1", "1Mi", now=5.0)
    assert u.memory == 100.0


# --- real process collectors ----------------------------------------------------------------


def _cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def _burn() -> int:
    return sum(i * i for i in range(2_000_000))


def _rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_this_process_through_prometheus_client(
    replicas: list[Replica], resources: ReplicaResources
) -> None:
    """prometheus-client's own process collector, served on a real socket."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    replica = await Replica("self", app).start()
    replicas.append(replica)
    listed = [info("self", replica, pid=os.getpid())]

    t0, c0 = time.monotonic(), _cpu_time()
    await resources.scrape(KEY, listed, "1", "64Mi", t0)
    _burn()
    t1, c1 = time.monotonic(), _cpu_time()
    u = await resources.scrape(KEY, listed, "1", "64Mi", t1)
    assert u.cpu is not None and u.cpu > 0 and u.missing == missing()
    # What the replica reported against what this process measured itself (both read
    # the kernel's tick counters; the scrapes themselves add a little).
    assert u.cpu / 100 * (t1 - t0) == pytest.approx(c1 - c0, abs=0.05)
    assert u.memory is not None
    assert u.memory / 100 * 64 * Mi == pytest.approx(_rss(), rel=0.2)


BURN_MODEL = """
class Burn:
    def load(self):
        pass

    def predict(self, payload):
        return {"sum": sum(i * i for i in range(int(payload["n"])))}
"""


async def test_a_model_server_process(tmp_path: Path, procs: Procs) -> None:
    """A real replica under the contract: `python -m merlin_dp.servers.pyfunc`."""
    (tmp_path / "burn.py").write_text(BURN_MODEL)
    port = free_port()
    env = {
        "CARAML_HTTP_PORT": str(port),
        "CARAML_MODEL_NAME": "burn",
        "CARAML_MODEL_VERSION": "1",
        "CARAML_MODEL_FULL_NAME": "burn-1",
        "CARAML_ARTIFACT_LOCATION": str(tmp_path),
    }
    args = ["env", *(f"{k}={v}" for k, v in env.items()),
            sys.executable, "-m", "merlin_dp.servers.pyfunc", "burn:Burn"]  # fmt: skip
    proc = Proc(args, port, tmp_path / "burn.log")
    procs.started.append(proc)
    wait_port(port)
    base = f"http://127.0.0.1:{port}"
    resources = ReplicaResources()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                async with session.get(f"{base}/v1/models/burn-1") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.02)
            listed = [info("burn-0", f"127.0.0.1:{port}", pid=proc.pid)]
            t0 = time.monotonic()
            first = await resources.scrape(KEY, listed, "1", "1Gi", t0)
            assert first.missing == missing(first_sample=1) and first.memory is not None
            body = {"n": 3_000_000}
            async with session.post(f"{base}/v1/models/burn-1:predict", json=body) as r:
                assert r.status == 200
            u = await resources.scrape(KEY, listed, "1", "1Gi", time.monotonic())
        assert u.missing == missing() and u.expected == 1
        assert u.cpu is not None and u.cpu > 0
        assert u.memory is not None
        assert u.memory / 100 * 2**30 == pytest.approx(proc.rss_bytes(), rel=0.2)
    finally:
        await resources.close()


# --- the autoscaler's own metrics --------------------------------------------------------


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(key: str = KEY, **extra: str) -> tuple[tuple[str, str], ...]:
    project, model, version = key.split("/")
    pairs = {"project": project, "model": model, "version": version, **extra}
    return tuple(sorted(pairs.items()))


def test_metrics_render_and_parse_back() -> None:
    m = AutoscalerMetrics()
    m.observe_decision(KEY, desired=3, ready=2, reason="utilization 87%", metric="cpu_utilization",
                       value=87.5)  # fmt: skip
    m.observe_decision(KEY, desired=3, ready=3, reason="utilization 91%", metric="cpu_utilization",
                       value=91.0)  # fmt: skip
    m.observe_decision(KEY, desired=3, ready=3, reason="within tolerance",
                       metric="cpu_utilization", value=None)  # fmt: skip
    m.observe_utilization(
        KEY, Utilization(cpu=None, memory=40.0, memory_reported=2, expected=3,
                         missing=missing(unreachable=1, first_sample=2))
    )  # fmt: skip
    m.observe_decision("pricing/eta/7", desired=1, ready=0, reason="idle: within grace",
                       metric="rps", value=0.0)  # fmt: skip
    m.activation("pricing/eta/7")
    m.activation("pricing/eta/7")
    weird = 'http://gw"1\\\n:9090'
    m.set_gateway(weird, failures=4, age=None)
    m.set_gateway("http://127.0.0.1:9091", failures=0, age=1.5)

    text = m.render()
    got = parsed(text)
    eta = "pricing/eta/7"
    assert got[("merlin_autoscaler_desired_replicas", labels())] == 3
    assert got[("merlin_autoscaler_ready_replicas", labels())] == 3
    assert got[("merlin_autoscaler_signal_value", labels(metric="memory_utilization"))] == 40.0
    # No value now: no sample (rather than a stale one).
    assert ("merlin_autoscaler_signal_value", labels(metric="cpu_utilization")) not in got
    assert got[("merlin_autoscaler_signal_value", labels(eta, metric="rps"))] == 0.0
    for reason in MISSING_REASONS:
        expect = {"unreachable": 1, "first_sample": 2}.get(reason, 0)
        assert got[("merlin_autoscaler_replica_metrics_missing", labels(reason=reason))] == expect
    assert got[("merlin_autoscaler_decisions_total", labels(reason="utilization"))] == 2
    assert got[("merlin_autoscaler_decisions_total", labels(reason="within tolerance"))] == 1
    assert got[("merlin_autoscaler_decisions_total", labels(eta, reason="idle: within grace"))] == 1
    assert got[("merlin_autoscaler_activations_total", labels(eta))] == 2
    assert got[("merlin_autoscaler_activations_total", labels())] == 0
    assert got[("merlin_autoscaler_gateway_poll_failures_total", (("gateway", weird),))] == 4
    assert got[("merlin_autoscaler_signal_age_seconds", (("gateway", weird),))] == float("inf")
    assert got[
        ("merlin_autoscaler_signal_age_seconds", (("gateway", "http://127.0.0.1:9091"),))
    ] == 1.5  # fmt: skip
    assert "# TYPE merlin_autoscaler_decisions_total counter" in text
    assert "# TYPE merlin_autoscaler_replica_metrics_missing gauge" in text
    assert text.count("# HELP merlin_autoscaler_") == 8
    assert 'gateway="http://gw\\"1\\\\\\n:9090"' in text  # quote, backslash, newline escaped

    m.retain([eta])
    got = parsed(m.render())
    assert not any(dict(lbl).get("version") == "1" for _, lbl in got)
    assert got[("merlin_autoscaler_activations_total", labels(eta))] == 2


def test_decision_reasons_stay_few() -> None:
    assert reason_label("utilization 87%") == "utilization"
    assert reason_label("utilization 101.5%") == "utilization"
    assert reason_label("panic") == "panic"
    assert reason_label("idle: to zero") == "idle: to zero"
    assert reason_label("42") == "unknown"
    m = AutoscalerMetrics()
    for i in range(100):
        reason = f"reason {chr(65 + i // 26)}{chr(65 + i % 26)}"  # 100 different ones
        m.observe_decision(KEY, desired=1, ready=1, reason=reason, metric="rps", value=1.0)
    reasons = {
        dict(lbl)["reason"] for name, lbl in parsed(m.render())
        if name == "merlin_autoscaler_decisions_total"
    }  # fmt: skip
    assert len(reasons) == 33 and "other" in reasons
