"""The gRPC benchmark: ``python -m loadtests.bench grpc``.

Unary ``caraml.upi.v1.UniversalPredictionService/PredictValues`` through nginx
``grpc_pass`` (the native reference), a plain ``grpc.aio`` generic pass-through (the
Python reference, :mod:`loadtests.bench.grpc_servers.passthrough`) and, when
``merlin-dp gateway --help`` lists ``--grpc-port``, the gateway: its model endpoint
(``:authority`` ``m.bench.localhost``: 90/10 weights plus an ``x-model-version`` match
the load never sends) and its version endpoint (``m-1.bench.localhost``: pass-through).
Every target proxies to the same upstream: by default
:mod:`loadtests.bench.grpc_servers.fake_upstream` (a fixed answer at about 2 µs of CPU
per call, so the proxies are what is measured), or the real UPI model server
(``--upstream upi``: ``python -m merlin_dp.servers.upi row_scorer:RowScorer`` from
``examples/upi``), or both in turn (``--upstream both``).

The layout is the http benchmark's (``shared/BENCHMARKING.md``): the upstream and the load
generator on one CPU, each system under test (one process, one worker) on the other,
interleaved rounds (warm-up, saturating run, c=1 run per target), CPU µs per request of
the system under test from ``/proc``, per-round ratios to nginx and their medians, and
the same noise guard. The load generator is ``h2load -c4 -m16`` with a length-prefixed
``PredictValuesRequest`` body, ``content-type: application/grpc``, ``te: trailers`` and
the model endpoint's ``:authority``; h2load checks only the HTTP status, so before the
rounds (and again after them) every target is called with a real ``grpc.aio`` client
and must answer grpc-status 0 with the body the upstream gives when called directly.

The summary gives, per target, the medians of req/s, CPU µs/request and c=1 p50/p99, and
the medians of its per-round ratios to nginx: req/s over nginx's ("÷ nginx") and nginx's
CPU µs/request over its own ("CPU ÷", which doesn't depend on h2load keeping up). Options:
``--quick`` (1 round of 2 s), ``--rounds/--seconds/--warmup-seconds/--c1-seconds``,
``--clients/--streams`` (h2load's -c/-m), ``--nginx-no-keepalive`` (adds nginx without
upstream keepalive: a connection per call), ``--skip-gateway``.

Ends with ``RESULT grpc gateway/nginx=<ratio> c1_p50_overhead_ms=<ms>
grpc_aio/nginx=<ratio> gateway_cpu_ratio=<ratio>`` (``n/a`` for the gateway when it has no
gRPC port), from the first upstream's rounds. nginx doesn't multiplex calls on upstream
connections (64 calls in flight: 64 connections, one read and one write per call), so the
fake upstream spends several times more CPU per call behind nginx than behind a
multiplexing proxy, on the load CPU, and nginx's req/s may be held back by the load side:
the noise guard says so when a target kept its CPU under 85% busy, and the CPU ratio is
then the figure to trust. Like the other benchmarks it asserts nothing about the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc

from loadtests.bench.grpc_servers.fake_upstream import fake_response, grpc_frame
from loadtests.bench.options import (
    DEFAULT_LOAD_CPUS,
    DEFAULT_SUT_CPUS,
    non_negative_int,
    positive_int,
)
from loadtests.harness.errors import HarnessError
from loadtests.harness.loadgen import H2loadResult, run_h2load
from loadtests.harness.measure import (
    NGINX_SPREAD_LIMIT,
    RATIO_SPREAD_LIMIT,
    busy_machine,
    median,
    process_tree_cpu_seconds,
    relative_spread,
)
from loadtests.harness.ports import wait_for_http_ok, wait_for_port
from loadtests.harness.processes import ChildProcess, ProcessSet, managed_processes, usable_cpus
from loadtests.harness.routes import (
    BENCH_MODEL,
    BENCH_PROJECT,
    build_routes,
    canary_match_rule,
    write_route_file,
)
from loadtests.harness.systems import (
    REPO_ROOT,
    nginx_grpc_proxy_conf,
    start_gateway,
    start_nginx,
)
from loadtests.harness.tables import fmt_number, format_row, format_table
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import LOOPBACK, free_ports
from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2

SERVICE = "caraml.upi.v1.UniversalPredictionService"
METHOD_PATH = f"/{SERVICE}/PredictValues"
MODEL_AUTHORITY = f"{BENCH_MODEL}.{BENCH_PROJECT}.localhost"
VERSION_AUTHORITY = f"{BENCH_MODEL}-1.{BENCH_PROJECT}.localhost"
# h2load's saturating load (BENCHMARKING.md): 4 connections x 16 streams in flight.
DEFAULT_CLIENTS = 4
DEFAULT_STREAMS = 16
CHECK_TIMEOUT_S = 5.0
# A system under test below this share of its CPU under the saturating load was held back
# by something else (the load CPU, most likely).
SATURATED_CPU_SHARE = 0.85
UPI_EXAMPLE_DIR = REPO_ROOT / "examples" / "upi"
UPI_EXAMPLE_CLASS = "row_scorer:RowScorer"

NGINX = "nginx"
GRPC_AIO = "grpc.aio pass-through"
GATEWAY = "gateway"
GATEWAY_VERSION = "gateway version"
NGINX_NO_KEEPALIVE = "nginx no keepalive"
FAKE = "fake"
UPI = "upi"


# --- the request ----------------------------------------------------------------------


def bench_request() -> upi_pb2.PredictValuesRequest:
    """What the load sends: a one-row table (a DOUBLE and an INTEGER column)."""
    return upi_pb2.PredictValuesRequest(
        prediction_table=table_pb2.Table(
            name="bench",
            columns=[
                table_pb2.Column(name="a", type=type_pb2.TYPE_DOUBLE),
                table_pb2.Column(name="b", type=type_pb2.TYPE_INTEGER),
            ],
            rows=[
                table_pb2.Row(
                    row_id="r1",
                    values=[table_pb2.Value(double_value=1.0), table_pb2.Value(integer_value=2)],
                )
            ],
        ),
        metadata=upi_pb2.RequestMetadata(prediction_id="bench"),
    )


def parse_grpc_frames(data: bytes) -> list[bytes]:
    """The messages of a gRPC length-prefixed stream (uncompressed ones only)."""
    messages = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ValueError(f"truncated gRPC frame prefix at byte {pos}")
        if data[pos] != 0:
            raise ValueError(f"compressed gRPC frame at byte {pos}")
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        end = pos + 5 + length
        if end > len(data):
            raise ValueError(f"gRPC frame at byte {pos} claims {length} bytes, has fewer")
        messages.append(data[pos + 5 : end])
        pos = end
    return messages


def write_request_body(path: Path, request: upi_pb2.PredictValuesRequest | None = None) -> Path:
    """h2load's ``-d`` file: the request as one gRPC length-prefixed message."""
    message = (request if request is not None else bench_request()).SerializeToString()
    path.write_bytes(grpc_frame(message))
    return path


# --- checking a target with a real gRPC client ----------------------------------------


@dataclass(frozen=True)
class GrpcAnswer:
    """What one unary call got: the status code, details and the raw response message."""

    code: grpc.StatusCode
    details: str
    body: bytes


async def call_predict_async(
    port: int, authority: str, request: bytes, *, deadline_s: float = CHECK_TIMEOUT_S
) -> GrpcAnswer:
    """One raw-bytes PredictValues call to 127.0.0.1:`port` with `authority` (grpc.aio)."""
    options = [("grpc.default_authority", authority)]
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}", options=options) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD_PATH)
        try:
            body: bytes = await call(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            return GrpcAnswer(exc.code(), exc.details() or "", b"")
        return GrpcAnswer(grpc.StatusCode.OK, "", body)


def call_predict(port: int, authority: str, request: bytes) -> GrpcAnswer:
    return asyncio.run(call_predict_async(port, authority, request))


def check_answer(name: str, answer: GrpcAnswer, expected: bytes) -> None:
    """`answer` must be grpc-status 0 (OK) with exactly the `expected` message."""
    if answer.code != grpc.StatusCode.OK:
        raise HarnessError(
            f"{name}: expected grpc-status 0, got {answer.code.name} {answer.details}"
        )
    if answer.body != expected:
        got = upi_pb2.PredictValuesResponse.FromString(answer.body)
        want = upi_pb2.PredictValuesResponse.FromString(expected)
        raise HarnessError(f"{name}: unexpected response {got} (the upstream answers {want})")


# --- systems --------------------------------------------------------------------------


def grpc_routes(upstream: str) -> dict[str, Any]:
    """The http bench's route table (90/10 + an unsent header match) with protocol UPI_V1
    on the model endpoint and on every version endpoint, all served by `upstream`."""
    routes = build_routes(upstream, model_rule=canary_match_rule())
    for endpoint in (*routes["version_endpoints"], *routes["model_endpoints"]):
        endpoint["protocol"] = "UPI_V1"
    return routes


def gateway_has_grpc_port() -> bool:
    """Whether ``merlin-dp gateway --help`` lists ``--grpc-port``."""
    done = subprocess.run(
        [sys.executable, "-m", "merlin_dp", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    return "--grpc-port" in done.stdout


def start_fake_upstream(
    procs: ProcessSet, port: int, workdir: Path, cpus: str | None
) -> ChildProcess:
    """The h2c fake (:mod:`~loadtests.bench.grpc_servers.fake_upstream`) on 127.0.0.1:`port`."""
    argv = [sys.executable, "-m", "loadtests.bench.grpc_servers.fake_upstream", "--port", str(port)]
    proc = procs.start(
        "fake upstream", argv, cpus=cpus, log_path=workdir / "fake-upstream.log", cwd=REPO_ROOT
    )
    wait_for_port(LOOPBACK, port, proc=proc)
    return proc


def start_upi_upstream(
    procs: ProcessSet, grpc_port: int, http_port: int, workdir: Path, cpus: str | None
) -> ChildProcess:
    """The real UPI model server (examples/upi RowScorer) as version 1 of the bench model."""
    env = {
        **os.environ,
        "CARAML_GRPC_PORT": str(grpc_port),
        "CARAML_HTTP_PORT": str(http_port),
        "CARAML_MODEL_NAME": BENCH_MODEL,
        "CARAML_MODEL_VERSION": "1",
        "CARAML_MODEL_FULL_NAME": f"{BENCH_MODEL}-1",
        "CARAML_ARTIFACT_LOCATION": str(UPI_EXAMPLE_DIR),
        "STORAGE_URI": str(UPI_EXAMPLE_DIR),
    }
    argv = [sys.executable, "-m", "merlin_dp.servers.upi", UPI_EXAMPLE_CLASS]
    proc = procs.start(
        "upi upstream",
        argv,
        cpus=cpus,
        log_path=workdir / "upi-upstream.log",
        env=env,
        cwd=REPO_ROOT,
    )
    wait_for_port(LOOPBACK, grpc_port, proc=proc)
    wait_for_http_ok(LOOPBACK, http_port, f"/v1/models/{BENCH_MODEL}-1", proc=proc)
    return proc


def start_passthrough(
    procs: ProcessSet, name: str, port: int, upstream: str, workdir: Path, cpus: str | None
) -> ChildProcess:
    argv = [
        sys.executable, "-m", "loadtests.bench.grpc_servers.passthrough",
        "--port", str(port), "--upstream", upstream,
    ]  # fmt: skip
    log = workdir / f"{name.replace(' ', '-')}.log"
    proc = procs.start(name, argv, cpus=cpus, log_path=log, cwd=REPO_ROOT)
    wait_for_port(LOOPBACK, port, proc=proc)
    return proc


# --- h2load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcTarget:
    """A system under test: where the load goes, with which :authority, and its process."""

    name: str
    upstream: str  # FAKE or UPI
    port: int
    authority: str
    process: ChildProcess
    upstream_process: ChildProcess

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{METHOD_PATH}"


@dataclass(frozen=True)
class GrpcLoad:
    """How long and how hard each target is driven in a round."""

    seconds: int
    warmup_seconds: int
    c1_seconds: int
    clients: int
    streams: int
    load_cpus: str | None
    h2load_path: str
    body: Path
    workdir: Path


def h2load_grpc_argv(
    h2load_path: str,
    url: str,
    body: Path,
    authority: str,
    *,
    seconds: int,
    clients: int,
    streams: int,
    log_file: Path | None = None,
) -> list[str]:
    """h2load sending the framed gRPC body as unary calls over h2c for `seconds`."""
    argv = [
        h2load_path, "-t1", f"-c{clients}", f"-m{streams}", f"-D{seconds}",
        "-d", str(body),
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        "-H", f":authority: {authority}",
    ]  # fmt: skip
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    return argv


def run_h2load_grpc(
    target: GrpcTarget,
    load: GrpcLoad,
    *,
    seconds: int,
    clients: int,
    streams: int,
    latencies: bool = False,
) -> H2loadResult:
    """One h2load run against `target` (pinned to the load CPUs); with `latencies`, the
    per-request latencies come from h2load's log file."""
    log = load.workdir / "h2load-grpc.log" if latencies else None
    if log is not None:
        log.unlink(missing_ok=True)  # h2load appends
    argv = h2load_grpc_argv(
        load.h2load_path, target.url, load.body, target.authority,
        seconds=seconds, clients=clients, streams=streams, log_file=log,
    )  # fmt: skip
    return run_h2load(argv, load.load_cpus, seconds + 60, log)


# --- measuring ------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcRound:
    """One target in one round: the saturating run, its CPU cost, and the c=1 run."""

    target: str
    upstream: str
    round_index: int
    load: H2loadResult
    cpu_us_per_request: float
    upstream_cpu_us_per_request: float
    c1: H2loadResult

    @property
    def errors(self) -> int:
        return self.load.errors + self.c1.errors


def measure_grpc_target(target: GrpcTarget, round_index: int, load: GrpcLoad) -> GrpcRound:
    """Warm up, the saturating run with the CPU time of the target and of the upstream
    read around it, then c=1."""
    common: dict[str, Any] = {"clients": load.clients, "streams": load.streams}
    if load.warmup_seconds > 0:
        run_h2load_grpc(target, load, seconds=load.warmup_seconds, **common)
    target.process.check_alive(target.name)
    cpu_before = process_tree_cpu_seconds(target.process.pid)
    upstream_before = process_tree_cpu_seconds(target.upstream_process.pid)
    saturating = run_h2load_grpc(target, load, seconds=load.seconds, **common)
    cpu_after = process_tree_cpu_seconds(target.process.pid)
    upstream_after = process_tree_cpu_seconds(target.upstream_process.pid)
    target.process.check_alive(target.name)
    target.upstream_process.check_alive(target.upstream_process.name)
    served = saturating.succeeded
    cpu_us = (cpu_after - cpu_before) * 1e6 / served if served else float("nan")
    upstream_us = (upstream_after - upstream_before) * 1e6 / served if served else float("nan")
    c1 = run_h2load_grpc(
        target, load, seconds=load.c1_seconds, clients=1, streams=1, latencies=True
    )
    target.process.check_alive(target.name)
    return GrpcRound(target.name, target.upstream, round_index, saturating, cpu_us, upstream_us, c1)


# --- reporting ------------------------------------------------------------------------

_ROUND_HEADERS = ("round", "upstream", "target", "req/s", "CPU µs/req", "up µs/req",
                  "c1 p50 ms", "c1 p99 ms", "errors")  # fmt: skip
_ROUND_WIDTHS = (5, 8, 21, 8, 10, 9, 9, 9, 6)


def round_row(m: GrpcRound) -> list[str]:
    return [
        str(m.round_index + 1),
        m.upstream,
        m.target,
        fmt_number(m.load.requests_per_s, 0),
        fmt_number(m.cpu_us_per_request, 1),
        fmt_number(m.upstream_cpu_us_per_request, 1),
        fmt_number(m.c1.percentile_ms(50), 3),
        fmt_number(m.c1.percentile_ms(99), 3),
        str(m.errors),
    ]


@dataclass(frozen=True)
class GroupSummary:
    """Medians of one upstream's rounds: per-target ratios and c=1 overheads to nginx."""

    upstream: str
    rounds: int
    ratios: dict[str, float]
    cpu_ratios: dict[str, float]
    c1_overheads_ms: dict[str, float]
    warnings: list[str]


def summarize(
    measurements: Sequence[GrpcRound], upstream: str, target_names: Sequence[str]
) -> tuple[GroupSummary, list[list[str]]]:
    """The upstream's table rows and summary (medians of per-round values)."""
    by_round: dict[int, dict[str, GrpcRound]] = {}
    for m in measurements:
        if m.upstream == upstream:
            by_round.setdefault(m.round_index, {})[m.target] = m
    rounds = [r for r in by_round.values() if all(name in r for name in target_names)]

    def ratios(name: str) -> list[float]:
        return [r[name].load.requests_per_s / r[NGINX].load.requests_per_s for r in rounds]

    def cpu_ratios(name: str) -> list[float]:
        return [r[NGINX].cpu_us_per_request / r[name].cpu_us_per_request for r in rounds]

    def overheads(name: str) -> list[float]:
        return [r[name].c1.percentile_ms(50) - r[NGINX].c1.percentile_ms(50) for r in rounds]

    rows = []
    for name in target_names:
        ms = [r[name] for r in rounds]
        rows.append([
            upstream,
            name,
            fmt_number(median([m.load.requests_per_s for m in ms]), 0),
            fmt_number(median([m.cpu_us_per_request for m in ms]), 1),
            fmt_number(median([m.upstream_cpu_us_per_request for m in ms]), 1),
            fmt_number(median([m.c1.percentile_ms(50) for m in ms]), 3),
            fmt_number(median([m.c1.percentile_ms(99) for m in ms]), 3),
            fmt_number(median(ratios(name)), 3),
            fmt_number(median(cpu_ratios(name)), 3),
            fmt_number(median(overheads(name)), 3),
        ])  # fmt: skip
    warnings = []
    spread = relative_spread([r[NGINX].load.requests_per_s for r in rounds])
    if spread > NGINX_SPREAD_LIMIT:
        warnings.append(
            f"[{upstream}] nginx req/s varies {spread:.0%} across rounds "
            f"(limit {NGINX_SPREAD_LIMIT:.0%}); run it once more"
        )
    held_back = []
    for name in target_names:
        busy = median([r[name].cpu_us_per_request * r[name].load.requests_per_s / 1e6
                       for r in rounds])  # fmt: skip
        if busy < SATURATED_CPU_SHARE:
            held_back.append(f"{name} {busy:.0%}")
    if held_back:
        warnings.append(
            f"[{upstream}] CPU busy under load (median) below {SATURATED_CPU_SHARE:.0%}: "
            f"{', '.join(held_back)}; h2load, the upstream or other work held them back, "
            "so their req/s ratios are off; CPU ÷ depends on that less"
        )
    for name in target_names:
        if name == NGINX:
            continue
        spread = relative_spread(ratios(name))
        if spread > RATIO_SPREAD_LIMIT:
            warnings.append(
                f"[{upstream}] {name}/nginx ratio varies {spread:.0%} across rounds "
                f"(limit {RATIO_SPREAD_LIMIT:.0%}); run it once more"
            )
        errors = sum(r[name].errors for r in rounds)
        if errors:
            warnings.append(f"[{upstream}] {name}: {errors} failed, errored or non-2xx calls")
    summary = GroupSummary(
        upstream,
        len(rounds),
        {name: median(ratios(name)) for name in target_names},
        {name: median(cpu_ratios(name)) for name in target_names},
        {name: median(overheads(name)) for name in target_names},
        warnings,
    )
    return summary, rows


def report_grpc(
    measurements: Sequence[GrpcRound],
    upstreams: Sequence[str],
    target_names: Sequence[str],
    extra_warnings: Sequence[str] = (),
) -> None:
    """Medians per upstream and target, ratios, the noise guard and the RESULT line."""
    summaries: list[GroupSummary] = []
    rows: list[list[str]] = []
    for upstream in upstreams:
        summary, group_rows = summarize(measurements, upstream, target_names)
        summaries.append(summary)
        rows.extend(group_rows)
    print()
    print(
        f"medians over {summaries[0].rounds} rounds (ratios and overhead: medians of "
        "per-round values; ÷ nginx: req/s over nginx's, CPU ÷: nginx's CPU µs/req over "
        "the target's; up µs/req: the upstream's CPU per request, on the load CPU)"
    )
    print(format_table(
        ["upstream", "target", "req/s", "CPU µs/req", "up µs/req", "c1 p50 ms", "c1 p99 ms",
         "÷ nginx", "CPU ÷", "c1 p50 +ms"],
        rows, left_columns=2,
    ))  # fmt: skip
    print()
    for s in summaries:
        for name in target_names[1:]:
            print(
                f"[{s.upstream}] {name}/nginx: req/s {s.ratios[name]:.3f}, "
                f"by CPU µs/req {s.cpu_ratios[name]:.3f}"
            )
        if NGINX_NO_KEEPALIVE in s.ratios:
            vs_plain = s.ratios[GRPC_AIO] / s.ratios[NGINX_NO_KEEPALIVE]
            print(f"[{s.upstream}] {GRPC_AIO}/{NGINX_NO_KEEPALIVE} req/s = {vs_plain:.3f}")
    warnings = [w for s in summaries for w in s.warnings] + list(extra_warnings)
    for warning in warnings:
        print(f"inconclusive: {warning}")
    print(result_line(summaries[0]))


def result_line(summary: GroupSummary) -> str:
    gateway = summary.ratios.get(GATEWAY)
    overhead = summary.c1_overheads_ms.get(GATEWAY)
    return (
        f"RESULT grpc gateway/nginx={_num(gateway)} c1_p50_overhead_ms={_num(overhead)} "
        f"grpc_aio/nginx={_num(summary.ratios.get(GRPC_AIO))} "
        f"gateway_cpu_ratio={_num(summary.cpu_ratios.get(GATEWAY))}"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


# --- the benchmark --------------------------------------------------------------------


# Round settings: (normal default, --quick default); an explicit option wins over both.
ROUND_DEFAULTS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "rounds": (5, 1),
    "seconds": (10, 2),
    "warmup_seconds": (2, 1),
})  # fmt: skip


def apply_quick(args: argparse.Namespace) -> None:
    """Fill in the round settings left unset: --quick's short ones or the normal ones."""
    for name, (normal, quick) in ROUND_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.c1_seconds is None:
        args.c1_seconds = 1 if args.quick else min(5, args.seconds)


def _upstreams(choice: str) -> list[str]:
    return [FAKE, UPI] if choice == "both" else [choice]


def run_grpc(args: argparse.Namespace) -> int:
    """nginx grpc_pass vs the grpc.aio pass-through vs the gateway's gRPC port."""
    apply_quick(args)
    tools = ensure_tools(["nginx", "h2load"])
    sut_cpus, load_cpus = usable_cpus(args.sut_cpu, args.load_cpu)
    c1_seconds: int = args.c1_seconds
    with_gateway = not args.skip_gateway and gateway_has_grpc_port()
    target_names = [NGINX, GRPC_AIO] + ([GATEWAY, GATEWAY_VERSION] if with_gateway else [])
    if args.nginx_no_keepalive:
        target_names.insert(1, NGINX_NO_KEEPALIVE)
    upstreams = _upstreams(args.upstream)
    n_targets = len(target_names) * len(upstreams)
    per_round = n_targets * (args.warmup_seconds + args.seconds + c1_seconds)
    if not with_gateway:
        why = "--skip-gateway" if args.skip_gateway else "merlin-dp gateway has no --grpc-port"
        print(f"bench grpc: {why}: the gateway is not measured", flush=True)
    print(
        f"bench grpc: {args.rounds} rounds x {n_targets} targets ({', '.join(target_names)}; "
        f"upstream {' and '.join(upstreams)}), {args.seconds}s of h2load "
        f"-c{args.clients} -m{args.streams} after {args.warmup_seconds}s warm-up, then "
        f"{c1_seconds}s at c=1 (about {args.rounds * per_round}s); systems under test on "
        f"CPU {sut_cpus}, upstream and h2load on CPU {load_cpus}",
        flush=True,
    )
    extra_warnings = []
    busy = busy_machine()
    if busy is not None:
        extra_warnings.append(
            f"load average {busy[0]:.2f} before the run: other work competes with the "
            "systems under test and h2load; run it once more on a quiet machine"
        )
    measurements: list[GrpcRound] = []
    with (
        tempfile.TemporaryDirectory(prefix="merlin-bench-grpc-") as tmp,
        managed_processes() as procs,
    ):
        workdir = Path(tmp)
        body = write_request_body(workdir / "request.bin")
        request = parse_grpc_frames(body.read_bytes())[0]
        targets: list[GrpcTarget] = []
        expected: dict[str, bytes] = {}
        for upstream_kind in upstreams:
            group = start_group(
                procs, upstream_kind, target_names, args=args, nginx_path=tools["nginx"],
                workdir=workdir, sut_cpus=sut_cpus, load_cpus=load_cpus,
            )  # fmt: skip
            targets.extend(group.targets)
            expected[upstream_kind] = group.expected
        check_targets(targets, request, expected)
        load = GrpcLoad(
            seconds=args.seconds, warmup_seconds=args.warmup_seconds, c1_seconds=c1_seconds,
            clients=args.clients, streams=args.streams, load_cpus=load_cpus,
            h2load_path=tools["h2load"], body=body, workdir=workdir,
        )  # fmt: skip
        print(format_table(_ROUND_HEADERS, [], min_widths=_ROUND_WIDTHS, left_columns=3))
        for round_index in range(args.rounds):
            for target in targets:
                m = measure_grpc_target(target, round_index, load)
                measurements.append(m)
                print(format_row(round_row(m), _ROUND_WIDTHS, left_columns=3), flush=True)
        try:
            check_targets(targets, request, expected)
        except HarnessError as exc:
            extra_warnings.append(f"after the rounds: {exc}")
    report_grpc(measurements, upstreams, target_names, extra_warnings)
    return 0


@dataclass(frozen=True)
class TargetGroup:
    targets: list[GrpcTarget]
    expected: bytes  # the upstream's answer to the bench request, called directly


def start_group(
    procs: ProcessSet,
    upstream_kind: str,
    target_names: Sequence[str],
    *,
    args: argparse.Namespace,
    nginx_path: str,
    workdir: Path,
    sut_cpus: str | None,
    load_cpus: str | None,
) -> TargetGroup:
    """Start one upstream and every system under test in front of it."""
    ports = free_ports(8)
    upstream_port, upstream_http, nginx_port, aio_port, gw_http, gw_admin, gw_grpc = ports[:7]
    sub = workdir / upstream_kind
    sub.mkdir()
    if upstream_kind == UPI:
        up = start_upi_upstream(procs, upstream_port, upstream_http, sub, load_cpus)
    else:
        up = start_fake_upstream(procs, upstream_port, sub, load_cpus)
    upstream = f"{LOOPBACK}:{upstream_port}"
    direct = call_predict(upstream_port, VERSION_AUTHORITY, bench_request().SerializeToString())
    if upstream_kind == FAKE:
        check_answer("fake upstream", direct, fake_response().SerializeToString())
    else:
        check_answer("upi upstream", direct, direct.body)
    nginx = start_nginx(
        procs, f"nginx-{upstream_kind}", lambda p: nginx_grpc_proxy_conf(p, nginx_port, upstream),
        nginx_path=nginx_path, port=nginx_port, workdir=sub, cpus=sut_cpus,
    )  # fmt: skip
    aio = start_passthrough(procs, f"{GRPC_AIO} {upstream_kind}", aio_port, upstream, sub, sut_cpus)
    targets = [GrpcTarget(NGINX, upstream_kind, nginx_port, MODEL_AUTHORITY, nginx, up)]
    if NGINX_NO_KEEPALIVE in target_names:
        plain_port = ports[7]
        plain = start_nginx(
            procs, f"nginx-no-keepalive-{upstream_kind}",
            lambda p: nginx_grpc_proxy_conf(p, plain_port, upstream, keepalive=False),
            nginx_path=nginx_path, port=plain_port, workdir=sub, cpus=sut_cpus,
        )  # fmt: skip
        targets.append(GrpcTarget(NGINX_NO_KEEPALIVE, upstream_kind, plain_port,
                                  MODEL_AUTHORITY, plain, up))  # fmt: skip
    targets.append(GrpcTarget(GRPC_AIO, upstream_kind, aio_port, MODEL_AUTHORITY, aio, up))
    if GATEWAY in target_names:
        routes_file = write_route_file(grpc_routes(upstream), sub / "routes.yaml")
        gateway = start_gateway(
            procs, routes_file, port=gw_http, admin_port=gw_admin, workdir=sub, cpus=sut_cpus,
            extra_args=["--grpc-port", str(gw_grpc), *args.gateway_arg],
            name=f"gateway-{upstream_kind}",
        )  # fmt: skip
        wait_for_port(LOOPBACK, gw_grpc, proc=gateway)
        targets += [
            GrpcTarget(GATEWAY, upstream_kind, gw_grpc, MODEL_AUTHORITY, gateway, up),
            GrpcTarget(GATEWAY_VERSION, upstream_kind, gw_grpc, VERSION_AUTHORITY, gateway, up),
        ]
    return TargetGroup(targets, direct.body)


def check_targets(
    targets: Sequence[GrpcTarget], request: bytes, expected: Mapping[str, bytes]
) -> None:
    """Call every target with a real grpc.aio client: grpc-status 0 and the upstream's body."""
    for target in targets:
        answer = call_predict(target.port, target.authority, request)
        try:
            check_answer(f"{target.name} ({target.upstream})", answer, expected[target.upstream])
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{target.process.describe_failure()}") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "grpc",
        help="nginx grpc_pass vs the gateway's gRPC port (and a grpc.aio pass-through)",
        description=(
            "Compare nginx grpc_pass (upstream keepalive) with a plain grpc.aio raw-bytes "
            "pass-through and, when `merlin-dp gateway --help` lists --grpc-port, the "
            "gateway's UPI_V1 model endpoint (90/10 + an unsent header match) and version "
            "endpoint, all in front of one h2c upstream (a fast fake, or the UPI model "
            "server). Load: h2load with a framed PredictValuesRequest; grpc-status is "
            "checked with a grpc.aio client before and after the rounds. Ends with: "
            "RESULT grpc gateway/nginx=<ratio> c1_p50_overhead_ms=<ms> grpc_aio/nginx=<ratio> "
            "gateway_cpu_ratio=<ratio>"
        ),
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=None,
        help="interleaved rounds (default: 5; --quick: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=positive_int, default=None,
        help="seconds of each saturating run (default: 10; --quick: 2)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-seconds", type=non_negative_int, default=None,
        help="seconds of warm-up before each saturating run (default: 2; --quick: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--c1-seconds", type=positive_int, default=None,
        help="seconds of each c=1 latency run (default: min(5, --seconds); --quick: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: shorter defaults for the four options above",
    )  # fmt: skip
    parser.add_argument(
        "--clients", type=positive_int, default=DEFAULT_CLIENTS,
        help="h2load connections of the saturating run (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--streams", type=positive_int, default=DEFAULT_STREAMS,
        help="h2load streams in flight per connection (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--upstream", choices=[FAKE, UPI, "both"], default=FAKE,
        help="what the proxies call: the h2c fake, the UPI model server (examples/upi "
        "RowScorer), or both in turn (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--nginx-no-keepalive", action="store_true",
        help="also measure nginx grpc_pass without upstream keepalive (a connection per "
        "call: what the issue's '73%%' was measured against)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-gateway", action="store_true",
        help="measure only nginx and the grpc.aio pass-through",
    )  # fmt: skip
    parser.add_argument(
        "--sut-cpu", default=DEFAULT_SUT_CPUS,
        help="CPU list (taskset -c) of the systems under test (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--load-cpu", default=DEFAULT_LOAD_CPUS,
        help="CPU list (taskset -c) of h2load and the upstream (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="extra gateway argument, repeatable; write options as "
                             "--gateway-arg=--workers=2")  # fmt: skip
    parser.set_defaults(run=run_grpc)
