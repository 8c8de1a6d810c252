"""The autoscale benchmark, ``python -m loadtests.bench autoscale``: this project's policy,
Knative's KPA (concurrency; concurrency with max-scale at twice the needed peak; rps), the
HPA on CPU and a clairvoyant oracle, each run through :mod:`loadtests.autoscale_sim` (the
model, deterministic and seeded) on every trace, start-up time and concurrency limit, over
the seeds; the baselines are in :mod:`loadtests.autoscale_baselines`.

Per trace, start-up time and limit, over the seeds: replica-seconds (mean), as a multiple
of the oracle's; the share of requests that waited over the SLO (pooled); p99 latency
(mean); time from a step-up until ready capacity covers the new rate; direction changes
and peak replicas (the most over seeds). ``slo_vs_best_kpa`` compares miss shares with a
floor of 0.1% (:data:`~loadtests.autoscale_sim.SLO_FLOOR`): below it, differences are a
handful of requests in 10^5, the noise of the draws (the oracle itself misses that many).
A cell is dominated when a baseline is both cheaper and misses the SLO less; predictable
cells (:data:`~loadtests.autoscale_sim.PREDICTABLE`) are where the SLO is compared with
the best KPA and the cost with 1.15x the oracle (periodic from ``learned_at``). Ends with
``RESULT autoscale worst_cost_vs_oracle=<worst> dominated_cells=<n>
slo_vs_best_kpa=<worst over predictable cells> max_direction_changes_steady=<n>``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from loadtests import autoscale_baselines as baselines
from loadtests.autoscale_sim import (
    LIMITS,
    PREDICTABLE,
    SEEDS,
    SERVICE_MEAN_S,
    SLO_FLOOR,
    SLO_WAIT_S,
    STARTUPS,
    TRACES,
    ControllerFactory,
    ProjectPolicy,
    RunResult,
    Trace,
    make_workload,
    simulate,
)

POLICIES: tuple[str, ...] = ("ours", "kpa", "kpa-max2x", "kpa-rps", "hpa-cpu", "oracle")
KPA_VARIANTS: tuple[str, ...] = ("kpa", "kpa-max2x", "kpa-rps")


def factory_for(name: str) -> ControllerFactory:
    if name == "ours":
        return ProjectPolicy
    if name == "ours-rps":
        return lambda view: ProjectPolicy(view, "rps")
    if name == "kpa":
        return baselines.kpa_concurrency
    if name == "kpa-max2x":
        return baselines.kpa_concurrency_capped
    if name == "kpa-rps":
        return baselines.kpa_rps
    if name == "hpa-cpu":
        return baselines.hpa_cpu
    if name == "oracle":
        return baselines.oracle
    raise ValueError(f"unknown policy {name!r}")


Key = tuple[str, int, int, str, int]  # trace, startup, limit, policy, seed


def run_trace_seed(
    args: tuple[Trace, int, tuple[int, ...], tuple[int, ...], tuple[str, ...]],
) -> list[tuple[Key, RunResult]]:
    trace, seed, startups, limits, policies = args
    work = make_workload(trace, seed)
    out = []
    for startup in startups:
        for limit in limits:
            for name in policies:
                result = simulate(trace, work, factory_for(name), startup, limit)
                out.append(((trace.name, startup, limit, name, seed), result))
    return out


def run_all(
    traces: Iterable[Trace] = TRACES,
    seeds: Iterable[int] = SEEDS,
    startups: tuple[int, ...] = STARTUPS,
    limits: tuple[int, ...] = LIMITS,
    policies: tuple[str, ...] = POLICIES,
    jobs: int = 1,
) -> dict[Key, RunResult]:
    tasks = [(tr, seed, startups, limits, policies) for tr in traces for seed in seeds]
    # The biggest tasks first, so two workers finish together.
    tasks.sort(key=lambda task: -task[0].peak * task[0].duration)
    results: dict[Key, RunResult] = {}
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            for chunk in pool.imap_unordered(run_trace_seed, tasks):
                results.update(chunk)
    else:
        for task in tasks:
            results.update(run_trace_seed(task))
    return results


@dataclass(frozen=True)
class Row:
    cost: float
    cost_learned: float  # from the trace's learned_at on
    misses: float  # share of requests
    p99: float
    time_to_capacity: float | None
    direction_changes: int  # the most over seeds
    peak: int


def aggregate(runs: list[RunResult]) -> Row:
    caps = [r.time_to_capacity for r in runs if r.time_to_capacity is not None]
    requests = sum(r.requests for r in runs)
    return Row(
        cost=sum(r.cost for r in runs) / len(runs),
        cost_learned=sum(r.cost_learned for r in runs) / len(runs),
        misses=sum(r.misses for r in runs) / requests if requests else 0.0,
        p99=sum(r.p99 for r in runs) / len(runs),
        time_to_capacity=sum(caps) / len(caps) if caps else None,
        direction_changes=max(r.direction_changes for r in runs),
        peak=max(r.peak for r in runs),
    )


def slo_ratio(ours: float, best: float) -> float:
    """Ours / best miss shares, each at least :data:`SLO_FLOOR` (below it, differences are
    a handful of requests in 10^5: Poisson noise, not a policy's doing)."""
    return max(ours, SLO_FLOOR) / max(best, SLO_FLOOR)


BASELINES: tuple[str, ...] = (*KPA_VARIANTS, "hpa-cpu")
TIGHT_COST = 1.15  # the goal on predictable cells
COST_CAP = 1.5  # the goal on every cell (no runaway)


@dataclass(frozen=True)
class Summary:
    cost_vs_oracle: float  # worst over every cell
    dominated_cells: list[str]  # a baseline both cheaper and missing the SLO less
    slo_vs_best_kpa: float  # worst over the predictable cells
    max_direction_changes_steady: int
    worst_cost: str
    worst_slo: str
    over_tight: list[str]  # predictable cells costing over TIGHT_COST x the oracle


def cost_ratio(table: dict[tuple[str, int, int, str], Row], cell: tuple[str, int, int],
               policy: str, learned: bool = False) -> float:  # fmt: skip
    row, oracle = table[(*cell, policy)], table[(*cell, "oracle")]
    mine, theirs = (row.cost_learned, oracle.cost_learned) if learned else (row.cost, oracle.cost)
    return mine / theirs if theirs else math.inf


def summarize(table: dict[tuple[str, int, int, str], Row], policy: str = "ours") -> Summary:
    cost_worst, slo_worst, steady = (0.0, ""), (0.0, ""), 0
    dominated: list[str] = []
    over_tight: list[str] = []
    for (trace, startup, limit, name), row in table.items():
        if name != policy:
            continue
        cell = (trace, startup, limit)
        label = f"{trace}/startup={startup}s/limit={limit}"
        ratio = cost_ratio(table, cell, policy)
        if ratio > cost_worst[0]:
            cost_worst = (ratio, label)
        for other in BASELINES:
            theirs = table.get((*cell, other))
            if theirs is None:
                continue
            if theirs.cost < row.cost and slo_ratio(theirs.misses, row.misses) < 1.0:
                dominated.append(f"{label} by {other}")
                break
        predictable = startup in PREDICTABLE.get(trace, ())
        if predictable:
            tight = cost_ratio(table, cell, policy, learned=True)
            if tight > TIGHT_COST:
                over_tight.append(f"{label}: {tight:.2f}")
            best = min(table[(*cell, k)].misses for k in KPA_VARIANTS)
            slo = slo_ratio(row.misses, best)
            if slo > slo_worst[0] or not slo_worst[1]:
                slo_worst = (slo, label)
        if trace == "steady":
            steady = max(steady, row.direction_changes)
    return Summary(cost_worst[0], dominated, slo_worst[0], steady, cost_worst[1],
                   slo_worst[1], over_tight)  # fmt: skip


def build_table(
    results: dict[Key, RunResult],
) -> dict[tuple[str, int, int, str], Row]:
    grouped: dict[tuple[str, int, int, str], list[RunResult]] = {}
    for (trace, startup, limit, name, _seed), result in sorted(results.items()):
        grouped.setdefault((trace, startup, limit, name), []).append(result)
    return {key: aggregate(runs) for key, runs in grouped.items()}


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    return format(value, spec)


def format_table(
    table: dict[tuple[str, int, int, str], Row], traces: Sequence[Trace] = TRACES
) -> str:
    lines = []
    header = (
        f"{'policy':<10} {'replica-s':>10} {'x oracle':>9} {'SLO miss':>9} {'vs KPA*':>8} "
        f"{'p99 ms':>9} {'t-cap s':>8} {'dir chg':>7} {'peak':>6}"
    )
    blocks = sorted({(k[0], k[1], k[2]) for k in table}, key=lambda b: (
        [t.name for t in traces].index(b[0]) if b[0] in [t.name for t in traces] else 99,
        b[1], b[2]))  # fmt: skip
    for trace, startup, limit in blocks:
        oracle = table.get((trace, startup, limit, "oracle"))
        kpas = [table[(trace, startup, limit, k)].misses for k in KPA_VARIANTS
                if (trace, startup, limit, k) in table]  # fmt: skip
        best = min(kpas) if kpas else None
        lines.append("")
        lines.append(f"{trace}  startup={startup}s  limit={limit}")
        lines.append(header)
        for name in (*POLICIES, "ours-rps"):
            row = table.get((trace, startup, limit, name))
            if row is None:
                continue
            x = row.cost / oracle.cost if oracle and oracle.cost else None
            vs = slo_ratio(row.misses, best) if best is not None else None
            lines.append(
                f"{name:<10} {row.cost:>10.0f} {_fmt(x, '.2f'):>9} "
                f"{100 * row.misses:>8.2f}% {_fmt(vs, '.2f'):>8} {1000 * row.p99:>9.0f} "
                f"{_fmt(row.time_to_capacity, '.1f'):>8} {row.direction_changes:>7} "
                f"{row.peak:>6}"
            )
    return "\n".join(lines)


def run_benchmark(
    jobs: int = 2,
    seeds: Sequence[int] = SEEDS,
    traces: Sequence[Trace] = TRACES,
    policies: tuple[str, ...] = POLICIES,
    out: Callable[[str], None] = print,
) -> Summary:
    began = time.monotonic()
    results = run_all(traces, seeds, STARTUPS, LIMITS, policies, jobs)
    table = build_table(results)
    out(
        f"autoscale: {len(traces)} traces x startups {list(STARTUPS)} s x concurrency limits "
        f"{list(LIMITS)} x seeds {list(seeds)}; service log-normal mean "
        f"{1000 * SERVICE_MEAN_S:.0f} ms; SLO = wait <= {1000 * SLO_WAIT_S:.0f} ms"
    )
    out("columns: cost in replica-seconds (mean over seeds) and as a multiple of the oracle's; "
        "SLO miss = share of requests waiting over the SLO (pooled), vs KPA* = ours / the best "
        "KPA variant's; p99 latency (mean over seeds); t-cap = time from a step-up until ready "
        "capacity covers the new rate; dir chg = scale direction changes (most over seeds); "
        "peak = most replicas asked for")  # fmt: skip
    out(format_table(table, traces))
    summary = summarize(table)
    out("")
    out(f"worst cost vs oracle: {summary.cost_vs_oracle:.2f} ({summary.worst_cost}); "
        f"worst SLO vs best KPA on predictable cells: {summary.slo_vs_best_kpa:.2f} "
        f"({summary.worst_slo})")  # fmt: skip
    out(f"dominated cells: {', '.join(summary.dominated_cells) or 'none'}")
    out(f"predictable cells over {TIGHT_COST} x the oracle (periodic: once learned): "
        f"{', '.join(summary.over_tight) or 'none'}")  # fmt: skip
    out(f"elapsed: {time.monotonic() - began:.1f} s")
    out(
        f"RESULT autoscale worst_cost_vs_oracle={summary.cost_vs_oracle:.2f} "
        f"dominated_cells={len(summary.dominated_cells)} "
        f"slo_vs_best_kpa={summary.slo_vs_best_kpa:.2f} "
        f"max_direction_changes_steady={summary.max_direction_changes_steady}"
    )
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds (default: %(default)s)")  # fmt: skip
    parser.add_argument("--trace", action="append", choices=[t.name for t in TRACES],
                        help="only this trace (repeatable; default: all)")  # fmt: skip
    parser.add_argument("--with-ours-rps", action="store_true",
                        help="also run this project's policy on the rps metric")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    traces = [t for t in TRACES if not args.trace or t.name in args.trace]
    policies = POLICIES + (("ours-rps",) if args.with_ours_rps else ())
    run_benchmark(jobs=max(1, args.jobs), seeds=args.seeds, traces=traces, policies=policies)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "autoscale",
        help="simulated autoscaling: this project's policy vs KPA, HPA and an oracle",
        description=(
            "Simulate (deterministic, seeded) the project's autoscaling policy, Knative's "
            "KPA (concurrency, concurrency with max-scale at twice the needed peak, rps), "
            "the HPA on CPU and a clairvoyant oracle on steady, step, spike, diurnal, "
            "on/off and periodic traces, start-up 5 s and 30 s, concurrency limits 1 and "
            "4. Ends with: RESULT autoscale worst_cost_vs_oracle=<worst> "
            "dominated_cells=<n> slo_vs_best_kpa=<worst over predictable cells> "
            "max_direction_changes_steady=<n>"
        ),
    )
    add_arguments(parser)
    parser.set_defaults(run=run)
