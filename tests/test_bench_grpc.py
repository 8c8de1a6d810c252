"""The gRPC benchmark's pieces (``python -m loadtests.bench grpc``), quickly.

Real parts: the fake upstream and the grpc.aio pass-through as processes, called by a real
grpc.aio client through the generated stubs; nginx checks its own config; a one-round run
of the whole harness. Nothing here asserts a duration or a figure. Missing tools (nginx,
h2load) are installed the way the bench installs them, never skipped.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loadtests.bench.cli import build_parser
from loadtests.bench.grpc import (
    METHOD_PATH,
    MODEL_AUTHORITY,
    apply_quick,
    bench_request,
    call_predict_async,
    check_answer,
    grpc_routes,
    h2load_grpc_argv,
    parse_grpc_frames,
    start_fake_upstream,
    start_passthrough,
    write_request_body,
)
from loadtests.bench.grpc_servers.fake_upstream import fake_response, grpc_frame
from loadtests.harness.errors import HarnessError
from loadtests.harness.processes import ProcessSet, managed_processes
from loadtests.harness.systems import nginx_config_test, nginx_grpc_proxy_conf
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import free_ports
from merlin_dp.protos.caraml.upi.v1 import table_pb2, upi_pb2, upi_pb2_grpc
from merlin_dp.spec.routes import RouteTableSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def procs() -> Iterator[ProcessSet]:
    with managed_processes() as started:
        yield started


@pytest.fixture(scope="module")
def fake(procs: ProcessSet, tmp_path_factory: pytest.TempPathFactory) -> str:
    (port,) = free_ports(1)
    start_fake_upstream(procs, port, tmp_path_factory.mktemp("fake"), None)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def passthrough(procs: ProcessSet, fake: str, tmp_path_factory: pytest.TempPathFactory) -> int:
    (port,) = free_ports(1)
    start_passthrough(procs, "pass-through", port, fake, tmp_path_factory.mktemp("pt"), None)
    return port


def test_the_framed_body_parses_back_to_the_request(tmp_path: Path) -> None:
    body = write_request_body(tmp_path / "request.bin").read_bytes()
    assert body[0] == 0  # not compressed
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    (message,) = parse_grpc_frames(body)
    assert upi_pb2.PredictValuesRequest.FromString(message) == bench_request()
    assert parse_grpc_frames(grpc_frame(b"a") + grpc_frame(b"")) == [b"a", b""]
    for broken in (body[:3], body[:-1], grpc_frame(b"x", compressed=True)):
        with pytest.raises(ValueError):
            parse_grpc_frames(broken)


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


async def test_the_fake_upstream_answers_a_real_grpc_client(fake: str) -> None:
    options = [("grpc.default_authority", MODEL_AUTHORITY)]
    async with grpc.aio.insecure_channel(fake, options=options) as channel:
        stub = upi_pb2_grpc.UniversalPredictionServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.PredictValues(bench_request(), timeout=5)
        assert await call == fake_response()
        assert await call.code() == grpc.StatusCode.OK
        # Many calls in flight on the one connection, and a request spanning many frames.
        big = upi_pb2.PredictValuesRequest(prediction_table=table_pb2.Table(name="x" * 1_000_000))
        answers = await asyncio.gather(
            *(stub.PredictValues(bench_request(), timeout=10) for _ in range(200)),
            stub.PredictValues(big, timeout=10),
        )
    assert all(answer == fake_response() for answer in answers)


async def test_the_passthrough_forwards_to_the_upstream(passthrough: int) -> None:
    request = bench_request().SerializeToString()
    answer = await call_predict_async(passthrough, MODEL_AUTHORITY, request)
    check_answer("pass-through", answer, fake_response().SerializeToString())


async def test_a_wrong_answer_is_reported(fake: str) -> None:
    answer = await call_predict_async(_port(fake), MODEL_AUTHORITY, b"")
    with pytest.raises(HarnessError, match="unexpected response"):
        check_answer("fake", answer, upi_pb2.PredictValuesResponse().SerializeToString())


def test_the_nginx_grpc_config_is_valid(tmp_path: Path) -> None:
    nginx = ensure_tools(["nginx"])["nginx"]
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_grpc_proxy_conf(tmp_path, 1, "127.0.0.1:2"))
    done = nginx_config_test(nginx, conf, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "keepalive 128;" in conf.read_text()  # one connection per call without it


def test_the_gateway_routes_are_upi_v1() -> None:
    spec = RouteTableSpec.model_validate(grpc_routes("127.0.0.1:9"))
    assert {ve.protocol for ve in spec.version_endpoints} == {"UPI_V1"}
    assert [me.protocol for me in spec.model_endpoints] == ["UPI_V1"]


def test_h2load_sends_grpc_headers(tmp_path: Path) -> None:
    argv = h2load_grpc_argv(
        "h2load", f"http://127.0.0.1:1{METHOD_PATH}", tmp_path / "b", MODEL_AUTHORITY,
        seconds=1, clients=4, streams=16,
    )  # fmt: skip
    assert "content-type: application/grpc" in argv
    assert "te: trailers" in argv
    assert f":authority: {MODEL_AUTHORITY}" in argv
    assert argv[-1].endswith("/caraml.upi.v1.UniversalPredictionService/PredictValues")


def test_the_bench_has_the_grpc_subcommand_and_quick_defaults() -> None:
    args = build_parser().parse_args(["grpc", "--quick", "--upstream", "both", "--seconds", "3"])
    assert args.upstream == "both"
    apply_quick(args)
    assert (args.rounds, args.seconds, args.warmup_seconds, args.c1_seconds) == (1, 3, 1, 1)
    args = build_parser().parse_args(["grpc"])
    apply_quick(args)
    assert (args.rounds, args.seconds, args.warmup_seconds, args.c1_seconds) == (5, 10, 2, 5)


def test_a_one_round_run_prints_a_result_line() -> None:
    ensure_tools(["nginx", "h2load"])
    argv = [
        sys.executable, "-m", "loadtests.bench", "grpc",
        "--rounds", "1", "--seconds", "1", "--warmup-seconds", "0", "--c1-seconds", "1",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"RESULT grpc gateway/nginx=\S+ c1_p50_overhead_ms=\S+ grpc_aio/nginx=[0-9.]+"
        r" gateway_cpu_ratio=\S+",
        last,
    ), done.stdout
    assert "grpc.aio pass-through" in done.stdout
