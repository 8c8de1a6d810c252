"""The shadow benchmark, ``python -m loadtests.bench shadow``: what a 100% mirror costs.

Two gateways, both started once and pinned to the system-under-test CPU but loaded one at
a time: "plain" (a 90/10 model endpoint) and "mirror" (the same rule plus
``mirror: {version: "2", percent: 100}``; both versions are the one upstream, so the
comparisons agree). Per round, each gets a saturating run (req/s, CPU µs/request,
upstream exchanges per request) and then a fixed-rate ``h2load --h1 --rps`` run at 30% of
the plain gateway's saturating req/s in that round (p50/p99 from h2load's per-request
log, and the rate achieved); shadow counters come from the mirror gateway's admin
``/metrics``. Ends with ``RESULT shadow mirror/plain=<ratio> p99_fixed_rate_ratio=<ratio>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.bench.options import add_round_options, positive_int
from loadtests.harness.loadgen import (
    H2loadResult,
    LoadSettings,
    Target,
    WrkRequest,
    WrkResult,
    check_target,
    measure_saturating,
    run_h2load_fixed_rate,
    warm_up,
)
from loadtests.harness.measure import (
    NGINX_SPREAD_LIMIT,
    RATIO_SPREAD_LIMIT,
    median,
    relative_spread,
)
from loadtests.harness.processes import ChildProcess, managed_processes, usable_cpus
from loadtests.harness.prometheus import MetricSample, read_metrics
from loadtests.harness.routes import (
    BENCH_MODEL,
    BENCH_PROJECT,
    DEFAULT_WEIGHTS,
    build_routes,
    weighted_rule,
    with_mirror,
    write_route_file,
)
from loadtests.harness.systems import (
    UPSTREAM_BODY,
    nginx_proxy_conf,
    nginx_upstream_conf,
    start_gateway,
    start_nginx,
)
from loadtests.harness.tables import fmt_number, format_row, format_table, goal_mark
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import LOOPBACK, free_ports

SHADOW_PLAIN = "plain"
SHADOW_MIRROR = "mirror"
SHADOW_VERSION = "2"
# The fixed-rate run: this share of the plain gateway's saturating req/s in the same round,
# spread over this many h2load clients (one connection, one request in flight each).
FIXED_RATE_FRACTION = 0.3
FIXED_RATE_CLIENTS = 8
FIXED_RATE_WARMUP_S = 1
# A fixed-rate run that achieved less than this share of its rate didn't hold the rate.
ACHIEVED_RATE_LIMIT = 0.95
# The goals, reported and never asserted.
MIRROR_RATIO_GOAL = 0.60
P99_RATIO_GOAL = 1.5


# --- the gateway's shadow counters ----------------------------------------------------


@dataclass(frozen=True)
class ShadowCounters:
    """The gateway's ``gateway_shadow_*`` counters for one model endpoint, summed over
    shadow versions; `dropped` and `errors` are by reason."""

    sent: float = 0.0
    dropped: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    compared: float = 0.0
    mismatches: dict[str, float] = field(default_factory=dict)

    @property
    def dropped_total(self) -> float:
        return sum(self.dropped.values())

    @property
    def errors_total(self) -> float:
        return sum(self.errors.values())

    @property
    def mismatches_total(self) -> float:
        return sum(self.mismatches.values())

    def minus(self, earlier: ShadowCounters) -> ShadowCounters:
        """The counts since `earlier` (a reading of the same gateway)."""

        def diff(now: Mapping[str, float], then: Mapping[str, float]) -> dict[str, float]:
            return {k: v - then.get(k, 0.0) for k, v in now.items()}

        return ShadowCounters(
            self.sent - earlier.sent,
            diff(self.dropped, earlier.dropped),
            diff(self.errors, earlier.errors),
            self.compared - earlier.compared,
            diff(self.mismatches, earlier.mismatches),
        )


def shadow_counters(
    samples: Sequence[MetricSample], project: str = BENCH_PROJECT, model: str = BENCH_MODEL
) -> ShadowCounters:
    """Sum the ``gateway_shadow_*`` counters of model endpoint `project`/`model`."""
    sent = compared = 0.0
    dropped: dict[str, float] = {}
    errors: dict[str, float] = {}
    mismatches: dict[str, float] = {}
    for s in samples:
        if s.labels.get("project") != project or s.labels.get("model") != model:
            continue
        if s.name == "gateway_shadow_requests_total":
            result, reason = s.labels.get("result", ""), s.labels.get("reason", "") or "-"
            if result == "sent":
                sent += s.value
            elif result == "dropped":
                dropped[reason] = dropped.get(reason, 0.0) + s.value
            else:
                errors[reason] = errors.get(reason, 0.0) + s.value
        elif s.name == "gateway_shadow_compared_total":
            compared += s.value
        elif s.name == "gateway_shadow_mismatch_total":
            kind = s.labels.get("kind", "")
            mismatches[kind] = mismatches.get(kind, 0.0) + s.value
    return ShadowCounters(sent, dropped, errors, compared, mismatches)


def read_shadow_counters(admin_port: int) -> ShadowCounters:
    """The gateway's shadow counters for the bench model endpoint, read from /metrics."""
    return shadow_counters(read_metrics(admin_port))


# --- the benchmark --------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowMeasurement:
    """One gateway in one round of the shadow benchmark."""

    target: str
    round_index: int
    load: WrkResult  # the saturating run
    cpu_us_per_request: float  # over the saturating run
    load_shadow: ShadowCounters  # shadow counters' change over the saturating run
    rate: float  # the fixed rate asked for, req/s
    fixed: H2loadResult  # the fixed-rate run
    fixed_shadow: ShadowCounters  # shadow counters' change over the fixed-rate run

    @property
    def upstream_per_request(self) -> float:
        """Upstream exchanges per request in the saturating run: 1 plus the copies sent
        (or attempted and failed) per request."""
        if not self.load.requests:
            return float("nan")
        copies = self.load_shadow.sent + self.load_shadow.errors_total
        return 1.0 + copies / self.load.requests

    @property
    def errors(self) -> int:
        return self.load.errors + self.fixed.errors


def run_shadow(args: argparse.Namespace) -> int:
    """The gateway's 90/10 model endpoint without and with a 100% mirror to version 2.

    Two gateway processes are started once, both pinned to the system-under-test CPU, one
    with the plain 90/10 rule ("plain") and one with the same rule plus
    ``mirror: {version: "2", percent: 100}`` ("mirror"); only one is loaded at a time (the
    idle one costs next to nothing), which keeps restarts and their warm-up out of the
    rounds. Both versions' replicas are the one upstream nginx, so the shadow's answers
    equal the primary's and every comparison should agree. A request whose weighted
    choice is version 2 itself is not mirrored, so the mirror gateway makes about 1.9
    upstream exchanges per request, shown as "up/req".

    Each round, the plain and the mirror gateway (their order alternating across rounds)
    each get a warm-up and a saturating run (`wrk -t1 -c64`) with their CPU µs/request;
    then each gets a fixed-rate run at the same rate, --rate-fraction (30%) of the plain
    gateway's saturating req/s of that round, from `h2load --h1` (p50/p99 from its
    per-request log, and the rate it achieved). Shadow counters are read from each
    gateway's admin /metrics around every run.
    """
    tools = ensure_tools(["nginx", "wrk", "h2load"])
    sut_cpus, load_cpus = usable_cpus(args.sut_cpu, args.load_cpu)
    rate_seconds: int = args.rate_seconds if args.rate_seconds is not None else args.seconds
    per_round = 2 * (args.warmup_seconds + args.seconds + FIXED_RATE_WARMUP_S + rate_seconds)
    print(
        f"bench shadow: {args.rounds} rounds x 2 gateways (plain 90/10; mirror 90/10 + 100% "
        f"mirror to v{SHADOW_VERSION}), {args.seconds}s at c={args.connections} after "
        f"{args.warmup_seconds}s warm-up, then {rate_seconds}s at a fixed "
        f"{args.rate_fraction:.0%} of plain's req/s over {args.rate_clients} h2load clients "
        f"(about {args.rounds * per_round}s); gateways on CPU {sut_cpus}, upstream, wrk and "
        f"h2load on CPU {load_cpus}",
        flush=True,
    )
    measurements: list[ShadowMeasurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="merlin-bench-shadow-") as tmp,
        managed_processes() as procs,
    ):
        workdir = Path(tmp)
        upstream_port, plain_port, plain_admin, mirror_port, mirror_admin = free_ports(5)
        upstream = f"{LOOPBACK}:{upstream_port}"
        start_nginx(
            procs, "upstream", lambda p: nginx_upstream_conf(p, upstream_port),
            nginx_path=tools["nginx"], port=upstream_port, workdir=workdir, cpus=load_cpus,
        )  # fmt: skip
        plain_rule = weighted_rule(DEFAULT_WEIGHTS)
        mirror_rule = with_mirror(plain_rule, SHADOW_VERSION, 100)
        gateways: dict[str, tuple[ChildProcess, int, int]] = {}
        for name, rule, port, admin in (
            (SHADOW_PLAIN, plain_rule, plain_port, plain_admin),
            (SHADOW_MIRROR, mirror_rule, mirror_port, mirror_admin),
        ):
            routes = build_routes(upstream, model_rule=rule)
            routes_file = write_route_file(routes, workdir / f"routes-{name}.yaml")
            proc = start_gateway(
                procs, routes_file, port=port, admin_port=admin, workdir=workdir,
                cpus=sut_cpus, extra_args=args.gateway_arg, name=f"gateway-{name}",
            )  # fmt: skip
            gateways[name] = (proc, port, admin)
        request = WrkRequest(host_header=f"{BENCH_MODEL}.{BENCH_PROJECT}.localhost")
        targets = {
            name: Target(name, f"http://{LOOPBACK}:{port}", request, proc)
            for name, (proc, port, _) in gateways.items()
        }
        admin_ports = {name: admin for name, (_, _, admin) in gateways.items()}
        # --nginx-reference: nginx plain and with a 100% mirror, on the same CPU.
        references: dict[str, Target] = {}
        reference_cpu: dict[str, list[float]] = {}
        reference_rps: dict[str, list[float]] = {}
        reference_errors = 0
        if args.nginx_reference:
            for name, mirrored in ((SHADOW_PLAIN, False), (SHADOW_MIRROR, True)):
                port = free_ports(1)[0]
                conf = functools.partial(
                    nginx_proxy_conf, port=port, upstream=upstream, mirror=mirrored
                )
                proc = start_nginx(
                    procs, f"nginx-{name}", conf,
                    nginx_path=tools["nginx"], port=port, workdir=workdir, cpus=sut_cpus,
                )  # fmt: skip
                references[name] = Target(
                    f"nginx-{name}", f"http://{LOOPBACK}:{port}", WrkRequest(), proc
                )
        for target in targets.values():
            check_target(target, UPSTREAM_BODY)
        settings = LoadSettings(
            seconds=args.seconds,
            warmup_seconds=args.warmup_seconds,
            c1_seconds=0,  # no c=1 run here
            connections=args.connections,
            load_cpus=load_cpus,
            wrk_path=tools["wrk"],
            script_dir=workdir,
        )
        measured = dataclasses.replace(settings, warmup_seconds=0)
        print(format_table(_SHADOW_HEADERS, [], min_widths=_SHADOW_WIDTHS, left_columns=2))
        for round_index in range(args.rounds):
            order = [SHADOW_PLAIN, SHADOW_MIRROR]
            if round_index % 2:
                order.reverse()
            saturating: dict[str, tuple[WrkResult, float, ShadowCounters]] = {}
            for name in order:
                target = targets[name]
                warm_up(target, settings)
                before = read_shadow_counters(admin_ports[name])
                load, cpu_us = measure_saturating(target, measured)
                shadow = read_shadow_counters(admin_ports[name]).minus(before)
                saturating[name] = (load, cpu_us, shadow)
            rate = saturating[SHADOW_PLAIN][0].requests_per_s * args.rate_fraction
            rows: dict[str, ShadowMeasurement] = {}
            for name in order:
                target = targets[name]
                before = read_shadow_counters(admin_ports[name])
                fixed = run_h2load_fixed_rate(
                    tools["h2load"], target.url + request.path, request,
                    rate=rate, clients=args.rate_clients, seconds=rate_seconds,
                    warmup_seconds=FIXED_RATE_WARMUP_S, cpus=load_cpus, workdir=workdir,
                )  # fmt: skip
                target.process.check_alive(target.name)
                fixed_shadow = read_shadow_counters(admin_ports[name]).minus(before)
                load, cpu_us, load_shadow = saturating[name]
                rows[name] = ShadowMeasurement(
                    name, round_index, load, cpu_us, load_shadow, rate, fixed, fixed_shadow
                )
            for name in (SHADOW_PLAIN, SHADOW_MIRROR):
                measurements.append(rows[name])
                print(format_row(shadow_row(rows[name]), _SHADOW_WIDTHS, 2), flush=True)
            for name in order:
                if name in references:
                    warm_up(references[name], settings)
                    ref_load, ref_cpu = measure_saturating(references[name], measured)
                    reference_cpu.setdefault(name, []).append(ref_cpu)
                    reference_rps.setdefault(name, []).append(ref_load.requests_per_s)
                    reference_errors += ref_load.errors
        time.sleep(0.2)  # let the last copies' comparisons finish before the final reading
        totals = {name: read_shadow_counters(admin) for name, admin in admin_ports.items()}
    report_shadow(measurements, totals)
    if reference_cpu:
        # CPU a request, plain over mirror: what a native proxy's mirror costs, beside ours.
        per_round = [
            p / m
            for p, m in zip(reference_cpu[SHADOW_PLAIN], reference_cpu[SHADOW_MIRROR], strict=True)
        ]
        plain, mirror = (
            f"{statistics.median(reference_rps[n]):,.0f} req/s at "
            f"{statistics.median(reference_cpu[n]):.1f} µs/req"
            for n in (SHADOW_PLAIN, SHADOW_MIRROR)
        )
        print(
            f"nginx reference: plain {plain}, mirror {mirror}, {reference_errors} errors; "
            f"mirror/plain by CPU = {statistics.median(per_round):.3f} (median of rounds)"
        )
    return 0


_SHADOW_HEADERS = (
    "round", "target", "req/s", "CPU µs/req", "up/req",
    "rate", "achieved", "p50 ms", "p99 ms", "errors",
)  # fmt: skip
_SHADOW_WIDTHS = (5, 6, 8, 10, 6, 7, 8, 7, 7, 6)


def shadow_row(m: ShadowMeasurement) -> list[str]:
    return [
        str(m.round_index + 1),
        m.target,
        fmt_number(m.load.requests_per_s, 0),
        fmt_number(m.cpu_us_per_request, 1),
        fmt_number(m.upstream_per_request, 2),
        fmt_number(m.rate, 0),
        fmt_number(m.fixed.requests_per_s, 0),
        fmt_number(m.fixed.percentile_ms(50), 3),
        fmt_number(m.fixed.percentile_ms(99), 3),
        str(m.errors),
    ]


def _shadow_rounds(
    measurements: Sequence[ShadowMeasurement],
) -> list[dict[str, ShadowMeasurement]]:
    by_round: dict[int, dict[str, ShadowMeasurement]] = {}
    for m in measurements:
        by_round.setdefault(m.round_index, {})[m.target] = m
    return [r for r in by_round.values() if SHADOW_PLAIN in r and SHADOW_MIRROR in r]


def _shadow_ratios(rounds: Sequence[Mapping[str, ShadowMeasurement]]) -> dict[str, list[float]]:
    """Per-round mirror ÷ plain: saturating req/s, CPU µs/request, fixed-rate p50 and p99."""

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out: dict[str, list[float]] = {"rps": [], "cpu": [], "p50": [], "p99": []}
    for r in rounds:
        mirror, plain = r[SHADOW_MIRROR], r[SHADOW_PLAIN]
        out["rps"].append(ratio(mirror.load.requests_per_s, plain.load.requests_per_s))
        out["cpu"].append(ratio(mirror.cpu_us_per_request, plain.cpu_us_per_request))
        for pct in (50, 99):
            out[f"p{pct}"].append(
                ratio(mirror.fixed.percentile_ms(pct), plain.fixed.percentile_ms(pct))
            )
    return out


def _by_reason(counts: Mapping[str, float]) -> str:
    parts = [f"{reason} {n:.0f}" for reason, n in sorted(counts.items()) if n]
    return f" ({', '.join(parts)})" if parts else ""


def describe_shadow_counters(c: ShadowCounters) -> str:
    return (
        f"sent {c.sent:.0f}, dropped {c.dropped_total:.0f}{_by_reason(c.dropped)}, "
        f"error {c.errors_total:.0f}{_by_reason(c.errors)}, compared {c.compared:.0f}, "
        f"mismatches {c.mismatches_total:.0f}{_by_reason(c.mismatches)}"
    )


def report_shadow(
    measurements: Sequence[ShadowMeasurement], totals: Mapping[str, ShadowCounters]
) -> None:
    """Medians, per-round ratio medians, shadow totals, noise guard, the RESULT line."""
    rounds = _shadow_rounds(measurements)
    ratios = _shadow_ratios(rounds)
    rows = []
    for name in (SHADOW_PLAIN, SHADOW_MIRROR):
        ms = [r[name] for r in rounds]
        rps_ratio = median(ratios["rps"]) if name == SHADOW_MIRROR else 1.0
        p99_ratio = median(ratios["p99"]) if name == SHADOW_MIRROR else 1.0
        rows.append([
            name,
            fmt_number(median([m.load.requests_per_s for m in ms]), 0),
            fmt_number(median([m.cpu_us_per_request for m in ms]), 1),
            fmt_number(median([m.upstream_per_request for m in ms]), 2),
            fmt_number(median([m.fixed.requests_per_s for m in ms]), 0),
            fmt_number(median([m.fixed.percentile_ms(50) for m in ms]), 3),
            fmt_number(median([m.fixed.percentile_ms(99) for m in ms]), 3),
            fmt_number(rps_ratio, 3),
            fmt_number(p99_ratio, 3),
        ])  # fmt: skip
    print()
    print(f"medians over {len(rounds)} rounds (ratios: median of per-round values)")
    print(format_table(
        ["target", "req/s", "CPU µs/req", "up/req", "achieved", "p50 ms", "p99 ms",
         "÷ plain req/s", "÷ plain p99"],
        rows,
    ))  # fmt: skip

    mirror_ratio = median(ratios["rps"])
    p99_ratio = median(ratios["p99"])
    rate = median([r[SHADOW_PLAIN].rate for r in rounds])
    print()
    print(
        f"mirror/plain req/s = {mirror_ratio:.3f}, CPU µs/req = {median(ratios['cpu']):.3f}; "
        f"at a fixed {rate:,.0f} req/s: p50 ratio = {median(ratios['p50']):.3f}, "
        f"p99 ratio = {p99_ratio:.3f}"
    )
    print(
        f"goals (reported, not asserted): mirror/plain >= {MIRROR_RATIO_GOAL:.2f} "
        f"{goal_mark(mirror_ratio >= MIRROR_RATIO_GOAL)}, p99_fixed_rate_ratio <= "
        f"{P99_RATIO_GOAL:.2f} {goal_mark(p99_ratio <= P99_RATIO_GOAL)}"
    )
    for name in (SHADOW_MIRROR, SHADOW_PLAIN):
        if name in totals:
            print(f"{name} gateway shadow copies, whole run: "
                  f"{describe_shadow_counters(totals[name])}")  # fmt: skip

    for warning in shadow_noise_warnings(rounds, totals):
        print(f"inconclusive: {warning}")
    print(f"RESULT shadow mirror/plain={mirror_ratio:.3f} p99_fixed_rate_ratio={p99_ratio:.3f}")


def shadow_noise_warnings(
    rounds: Sequence[Mapping[str, ShadowMeasurement]], totals: Mapping[str, ShadowCounters]
) -> list[str]:
    """BENCHMARKING.md's noise guard with the plain gateway as the reference, plus fixed
    rates not held, errors, and a mirror that didn't copy (or didn't agree) as expected."""
    warnings = []
    plain_rps = [r[SHADOW_PLAIN].load.requests_per_s for r in rounds]
    spread = relative_spread(plain_rps)
    if spread > NGINX_SPREAD_LIMIT:
        warnings.append(
            f"plain gateway req/s varies {spread:.0%} across rounds "
            f"(limit {NGINX_SPREAD_LIMIT:.0%}); run it once more"
        )
    ratios = _shadow_ratios(rounds)
    for key, what in (("rps", "mirror/plain req/s"), ("p99", "p99_fixed_rate_ratio")):
        spread = relative_spread(ratios[key])
        if spread > RATIO_SPREAD_LIMIT:
            warnings.append(
                f"{what} varies {spread:.0%} across rounds "
                f"(limit {RATIO_SPREAD_LIMIT:.0%}); run it once more"
            )
    for r in rounds:
        for m in r.values():
            if m.fixed.requests_per_s < ACHIEVED_RATE_LIMIT * m.rate:
                warnings.append(
                    f"round {m.round_index + 1}: {m.target} held {m.fixed.requests_per_s:,.0f} "
                    f"of the fixed {m.rate:,.0f} req/s (under {ACHIEVED_RATE_LIMIT:.0%}); "
                    "its latency is not at that rate"
                )
    for name in (SHADOW_PLAIN, SHADOW_MIRROR):
        errors = sum(r[name].errors for r in rounds)
        if errors:
            warnings.append(f"{name} answered {errors} non-2xx responses or failed requests")
    mirror = totals.get(SHADOW_MIRROR)
    if mirror is not None:
        if mirror.dropped_total or mirror.errors_total:
            warnings.append(
                f"the mirror dropped {mirror.dropped_total:.0f}{_by_reason(mirror.dropped)} and "
                f"failed {mirror.errors_total:.0f}{_by_reason(mirror.errors)} copies, so it "
                "did less work than a full mirror"
            )
        if mirror.mismatches_total:
            warnings.append(
                f"{mirror.mismatches_total:.0f} shadow answers disagreed"
                f"{_by_reason(mirror.mismatches)} though both versions are the same upstream"
            )
    # A request whose weighted choice is the shadow version isn't copied: expect ~0.9.
    expected = 2.0 - DEFAULT_WEIGHTS.get(SHADOW_VERSION, 0) / 100.0
    copied = [r[SHADOW_MIRROR].upstream_per_request for r in rounds]
    if copied and median(copied) < expected - 0.1:
        warnings.append(
            f"the mirror gateway made {median(copied):.2f} upstream exchanges per request, "
            f"expected about {expected:.2f}: not every request was copied"
        )
    plain = totals.get(SHADOW_PLAIN)
    if plain is not None and plain.sent + plain.dropped_total + plain.errors_total:
        warnings.append(f"the plain gateway shadowed requests: {describe_shadow_counters(plain)}")
    return warnings


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "shadow",
        help="the gateway's 90/10 model endpoint without and with a 100%% mirror",
        description=(
            "Compare two gateways on CPU 1, a 90/10 model endpoint (plain) and the same "
            "rule plus mirror {version: 2, percent: 100} (mirror): saturating req/s and CPU "
            "µs/request at c=64, then p50/p99 with h2load at a fixed rate (a share of the "
            "plain gateway's req/s in the same round), and the shadow counters. Ends with: "
            "RESULT shadow mirror/plain=<ratio> p99_fixed_rate_ratio=<ratio>"
        ),
    )
    # The mirror's cost is a ratio within one checkout: to compare commits, run it in each.
    add_round_options(parser, c1=False, baseline=False)
    parser.add_argument(
        "--rate-fraction",
        type=_fraction,
        default=FIXED_RATE_FRACTION,
        help="fixed rate as a share of the plain gateway's saturating req/s in the round "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rate-clients",
        type=positive_int,
        default=FIXED_RATE_CLIENTS,
        help="h2load clients (connections) sharing the fixed rate (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-seconds",
        type=positive_int,
        default=None,
        help="seconds of each fixed-rate run, after a 1 s warm-up (default: --seconds)",
    )
    parser.add_argument(
        "--nginx-reference",
        action="store_true",
        help="also measure nginx proxy_pass without and with a 100%% mirror (the mirror "
        "directive) each round, and print nginx's mirror/plain by CPU a request",
    )
    parser.set_defaults(run=run_shadow)
