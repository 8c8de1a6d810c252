"""The http benchmark, ``python -m loadtests.bench http``: nginx ``proxy_pass`` against
the gateway's model endpoint (90/10 weights plus an ``X-Model-Version`` header match that
the load never triggers, so the match is evaluated on every request and the weights still
decide) and its pass-through version endpoint, all in front of one nginx upstream.

Per round and target: a warm-up, a saturating ``wrk`` run with the target's CPU
µs/request, and a c=1 run for latency. Ends with
``RESULT http gateway/nginx=<ratio> c1_p50_overhead_ms=<ms>``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.bench.options import add_round_options
from loadtests.harness.loadgen import (
    LoadSettings,
    Target,
    WrkRequest,
    WrkResult,
    check_target,
    measure_saturating,
    run_wrk,
)
from loadtests.harness.measure import (
    NGINX_SPREAD_LIMIT,
    RATIO_SPREAD_LIMIT,
    median,
    relative_spread,
)
from loadtests.harness.processes import managed_processes, usable_cpus
from loadtests.harness.routes import (
    BENCH_MODEL,
    BENCH_PROJECT,
    build_routes,
    canary_match_rule,
    write_route_file,
)
from loadtests.harness.systems import (
    UPSTREAM_BODY,
    nginx_proxy_conf,
    nginx_upstream_conf,
    start_gateway,
    start_nginx,
)
from loadtests.harness.tables import fmt_number, format_row, format_table
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import LOOPBACK, free_ports

HTTP_REFERENCE = "nginx"
HTTP_GATEWAY = "gateway"
HTTP_PASSTHROUGH = "passthrough"
HTTP_BASELINE = "baseline"  # the gateway from another checkout (--baseline-root)


@dataclass(frozen=True)
class RoundMeasurement:
    """One target in one round: the saturating run, its CPU cost, and the c=1 run."""

    target: str
    round_index: int
    load: WrkResult
    cpu_us_per_request: float
    c1: WrkResult


def measure_target(target: Target, round_index: int, settings: LoadSettings) -> RoundMeasurement:
    """Warm up, run the saturating load reading the target's CPU time around it, run c=1."""
    load, cpu_us = measure_saturating(target, settings)
    c1 = run_wrk(
        settings.wrk_path, target.url + target.request.path, target.request,
        seconds=settings.c1_seconds, connections=1, latency=True,
        cpus=settings.load_cpus, script_dir=settings.script_dir,
    )  # fmt: skip
    target.process.check_alive(target.name)
    return RoundMeasurement(target.name, round_index, load, cpu_us, c1)


_ROUND_HEADERS = ("round", "target", "req/s", "CPU µs/req", "c1 p50 ms", "c1 p99 ms", "errors")
_ROUND_WIDTHS = (5, 11, 8, 10, 9, 9, 6)


def round_row(m: RoundMeasurement) -> list[str]:
    return [
        str(m.round_index + 1),
        m.target,
        fmt_number(m.load.requests_per_s, 0),
        fmt_number(m.cpu_us_per_request, 1),
        fmt_number(m.c1.percentile_ms(50), 3),
        fmt_number(m.c1.percentile_ms(99), 3),
        str(m.load.errors + m.c1.errors),
    ]


def run_http(args: argparse.Namespace) -> int:
    """nginx proxy_pass vs the gateway (weighted model endpoint, pass-through version)."""
    tools = ensure_tools(["nginx", "wrk"])
    sut_cpus, load_cpus = usable_cpus(args.sut_cpu, args.load_cpu)
    c1_seconds = args.c1_seconds if args.c1_seconds is not None else min(5, args.seconds)
    n_targets = 3 + (args.baseline_root is not None)
    per_round = n_targets * (args.warmup_seconds + args.seconds + c1_seconds)
    print(
        f"bench http: {args.rounds} rounds x {n_targets} targets, "
        f"{args.seconds}s at c={args.connections} "
        f"after {args.warmup_seconds}s warm-up, then {c1_seconds}s at c=1 "
        f"(about {args.rounds * per_round}s); system under test on CPU {sut_cpus}, "
        f"upstream and wrk on CPU {load_cpus}",
        flush=True,
    )
    measurements: list[RoundMeasurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="merlin-bench-http-") as tmp,
        managed_processes() as procs,
    ):
        workdir = Path(tmp)
        upstream_port, proxy_port, gateway_port, admin_port = free_ports(4)
        upstream = f"{LOOPBACK}:{upstream_port}"
        start_nginx(
            procs, "upstream", lambda p: nginx_upstream_conf(p, upstream_port),
            nginx_path=tools["nginx"], port=upstream_port, workdir=workdir, cpus=load_cpus,
        )  # fmt: skip
        proxy = start_nginx(
            procs, "proxy", lambda p: nginx_proxy_conf(p, proxy_port, upstream),
            nginx_path=tools["nginx"], port=proxy_port, workdir=workdir, cpus=sut_cpus,
        )  # fmt: skip
        routes = build_routes(
            upstream, model_rule=canary_match_rule(),
            container_concurrency=args.container_concurrency,
        )  # fmt: skip
        routes_file = write_route_file(routes, workdir / "routes.yaml")
        # The baseline may predate container_concurrency: it gets the table without it.
        base_routes = write_route_file(
            build_routes(upstream, model_rule=canary_match_rule()), workdir / "base-routes.yaml"
        )
        gateway = start_gateway(
            procs, routes_file, port=gateway_port, admin_port=admin_port,
            workdir=workdir, cpus=sut_cpus, extra_args=args.gateway_arg,
        )  # fmt: skip
        model_host = f"{BENCH_MODEL}.{BENCH_PROJECT}.localhost"
        version_host = f"{BENCH_MODEL}-1.{BENCH_PROJECT}.localhost"
        targets = [
            Target(HTTP_REFERENCE, f"http://{LOOPBACK}:{proxy_port}",
                   WrkRequest(host_header=model_host), proxy),
            Target(HTTP_GATEWAY, f"http://{LOOPBACK}:{gateway_port}",
                   WrkRequest(host_header=model_host), gateway),
            Target(HTTP_PASSTHROUGH, f"http://{LOOPBACK}:{gateway_port}",
                   WrkRequest(host_header=version_host), gateway),
        ]  # fmt: skip
        if args.baseline_root is not None:
            # Before/after on the same machine minute by minute: the other checkout's
            # gateway takes its turn in every round.
            base_port, base_admin = free_ports(2)
            baseline = start_gateway(
                procs, base_routes, port=base_port, admin_port=base_admin, workdir=workdir,
                cpus=sut_cpus, extra_args=args.gateway_arg, name=HTTP_BASELINE,
                root=args.baseline_root,
            )  # fmt: skip
            targets.append(Target(HTTP_BASELINE, f"http://{LOOPBACK}:{base_port}",
                                  WrkRequest(host_header=model_host), baseline))  # fmt: skip
        for target in targets:
            check_target(target, UPSTREAM_BODY)
        settings = LoadSettings(
            seconds=args.seconds,
            warmup_seconds=args.warmup_seconds,
            c1_seconds=c1_seconds,
            connections=args.connections,
            load_cpus=load_cpus,
            wrk_path=tools["wrk"],
            script_dir=workdir,
        )
        print(format_table(_ROUND_HEADERS, [], min_widths=_ROUND_WIDTHS, left_columns=2))
        for round_index in range(args.rounds):
            for target in targets:
                m = measure_target(target, round_index, settings)
                measurements.append(m)
                print(format_row(round_row(m), _ROUND_WIDTHS, left_columns=2), flush=True)
    report_http(measurements, [t.name for t in targets])
    return 0


def report_http(measurements: Sequence[RoundMeasurement], target_names: Sequence[str]) -> None:
    """Medians per target, medians of the per-round ratios, noise guard, the RESULT line."""
    by_round: dict[int, dict[str, RoundMeasurement]] = {}
    for m in measurements:
        by_round.setdefault(m.round_index, {})[m.target] = m
    rounds = [r for r in by_round.values() if all(name in r for name in target_names)]

    def ratios(name: str) -> list[float]:
        return [r[name].load.requests_per_s / r[HTTP_REFERENCE].load.requests_per_s for r in rounds]

    def c1_overheads(name: str) -> list[float]:
        return [
            r[name].c1.percentile_ms(50) - r[HTTP_REFERENCE].c1.percentile_ms(50) for r in rounds
        ]

    rows = []
    for name in target_names:
        ms = [r[name] for r in rounds]
        rows.append([
            name,
            fmt_number(median([m.load.requests_per_s for m in ms]), 0),
            fmt_number(median([m.cpu_us_per_request for m in ms]), 1),
            fmt_number(median([m.c1.percentile_ms(50) for m in ms]), 3),
            fmt_number(median([m.c1.percentile_ms(99) for m in ms]), 3),
            fmt_number(median(ratios(name)), 3),
            fmt_number(median(c1_overheads(name)), 3),
        ])  # fmt: skip
    print()
    print(f"medians over {len(rounds)} rounds (ratio and overhead: median of per-round values)")
    print(format_table(
        ["target", "req/s", "CPU µs/req", "c1 p50 ms", "c1 p99 ms", "÷ nginx", "c1 p50 +ms"],
        rows,
    ))  # fmt: skip

    gateway_ratio = median(ratios(HTTP_GATEWAY))
    passthrough_ratio = median(ratios(HTTP_PASSTHROUGH))
    overhead_ms = median(c1_overheads(HTTP_GATEWAY))
    gateway_vs_passthrough = median([
        r[HTTP_GATEWAY].load.requests_per_s / r[HTTP_PASSTHROUGH].load.requests_per_s
        for r in rounds
    ])  # fmt: skip
    print()
    print(
        f"gateway/nginx req/s = {gateway_ratio:.3f}, passthrough/nginx req/s = "
        f"{passthrough_ratio:.3f}, c1 p50 overhead = {overhead_ms:.3f} ms "
        f"(passthrough {median(c1_overheads(HTTP_PASSTHROUGH)):.3f} ms)"
    )
    print(f"gateway/passthrough req/s = {gateway_vs_passthrough:.3f}")
    if HTTP_BASELINE in target_names:
        vs_base = median([r[HTTP_GATEWAY].load.requests_per_s
                          / r[HTTP_BASELINE].load.requests_per_s for r in rounds])  # fmt: skip
        cpu_base = median([r[HTTP_GATEWAY].cpu_us_per_request
                           / r[HTTP_BASELINE].cpu_us_per_request for r in rounds])  # fmt: skip
        print(f"gateway/baseline req/s = {vs_base:.3f}, CPU µs/req = {cpu_base:.3f} "
              "(median of per-round ratios)")  # fmt: skip

    for warning in http_noise_warnings(rounds, target_names):
        print(f"inconclusive: {warning}")
    print(f"RESULT http gateway/nginx={gateway_ratio:.3f} c1_p50_overhead_ms={overhead_ms:.3f}")


def http_noise_warnings(
    rounds: Sequence[Mapping[str, RoundMeasurement]], target_names: Sequence[str]
) -> list[str]:
    """BENCHMARKING.md's noise guard, plus any target that answered errors."""
    warnings = []
    nginx_rps = [r[HTTP_REFERENCE].load.requests_per_s for r in rounds]
    spread = relative_spread(nginx_rps)
    if spread > NGINX_SPREAD_LIMIT:
        warnings.append(
            f"nginx req/s varies {spread:.0%} across rounds (limit {NGINX_SPREAD_LIMIT:.0%}); "
            "run it once more"
        )
    ratios = [r[HTTP_GATEWAY].load.requests_per_s / r[HTTP_REFERENCE].load.requests_per_s
              for r in rounds]  # fmt: skip
    spread = relative_spread(ratios)
    if spread > RATIO_SPREAD_LIMIT:
        warnings.append(
            f"gateway/nginx ratio varies {spread:.0%} across rounds "
            f"(limit {RATIO_SPREAD_LIMIT:.0%}); run it once more"
        )
    for name in target_names:
        errors = sum(r[name].load.errors + r[name].c1.errors for r in rounds)
        if errors:
            warnings.append(f"{name} answered {errors} non-2xx responses or socket errors")
    return warnings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "http",
        help="nginx proxy_pass vs the gateway over HTTP/1.1",
        description=(
            "Compare nginx proxy_pass with the gateway (model endpoint: 90/10 weights plus "
            "an X-Model-Version header match the load never triggers, and pass-through via "
            "the version endpoint host), all proxying to one nginx upstream. "
            "Ends with: RESULT http gateway/nginx=<ratio> c1_p50_overhead_ms=<ms>"
        ),
    )
    add_round_options(parser)
    parser.add_argument(
        "--container-concurrency", type=int, default=None, metavar="N",
        help="limit the gateway's requests per replica (past it they queue in the gateway); "
        "the baseline runs without a limit. Default: no limit, the field left out",
    )  # fmt: skip
    parser.set_defaults(run=run_http)
