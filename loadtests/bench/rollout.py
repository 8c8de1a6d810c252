"""The rollout benchmark, ``python -m loadtests.bench rollout``: this project's rollout
analysis and Flagger's default one (:mod:`loadtests.rollout_sim`), on good candidates
and on bad ones (+1 and +5 points of server errors, 30% slower, 2% different
predictions), at 1, 10 and 100 requests/s, ``--runs`` seeded runs per cell.

Per cell and per analysis: candidates promoted, rolled back and undecided within the
hour; for good ones, wrongly rolled back and the time to promotion (median, p95); for
bad ones, promoted (missed) and the requests they answered to callers within the hour
(median, p95). Ends with ``RESULT rollout false_rollbacks=<n>/<runs>
missed_bad=<n>/<runs> bad_exposure_vs_flagger=<ratio> promote_time_vs_flagger=<ratio>``:
false rollbacks and missed bad candidates over every cell; the bad candidates' requests
answered in all, over Flagger's; the median time to promote a good candidate over
Flagger's, the worst rate's. All of the default plan; the table also runs it without its
shadow phase (``ours-canary``: the canary steps' analysis alone), summed up on a line.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loadtests.rollout_sim import (
    CANDIDATES,
    HORIZON_S,
    RATES,
    Candidate,
    Outcome,
    default_plan,
    run_flagger,
    run_ours,
)

RUNS = 200
# This project's default plan; the same plan without the shadow phase (the canary steps'
# sequential analysis alone, against Flagger's on the same footing); Flagger's default.
ANALYSES = ("ours", "ours-canary", "flagger")

Cell = tuple[float, str, str]  # rate, candidate, analysis


def run_cell(task: tuple[float, Candidate, str, int]) -> tuple[Cell, list[Outcome]]:
    rate, candidate, analysis, runs = task
    plan = default_plan()
    if analysis == "ours-canary":
        plan = plan.model_copy(update={"shadow": False})
    outcomes = []
    for i in range(runs):
        seed = int(rate * 1_000_003) + 7919 * i + 104_729 * CANDIDATES.index(candidate)
        if analysis == "flagger":
            outcomes.append(run_flagger(rate, candidate, seed))
        else:
            outcomes.append(run_ours(rate, candidate, seed, plan))
    return (rate, candidate.name, analysis), outcomes


def run_all(rates: Sequence[float], runs: int, jobs: int) -> dict[Cell, list[Outcome]]:
    tasks = [(r, c, a, runs) for r in rates for c in CANDIDATES for a in ANALYSES]
    # Slow cells first (low rates take longest to decide), so workers finish together.
    tasks.sort(key=lambda t: (t[0], t[2] == "flagger"))
    results: dict[Cell, list[Outcome]] = {}
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for cell, outcomes in pool.imap_unordered(run_cell, tasks):
                results[cell] = outcomes
    else:
        for task in tasks:
            cell, outcomes = run_cell(task)
            results[cell] = outcomes
    return results


@dataclass(frozen=True)
class Row:
    runs: int
    promoted: int
    rolled_back: int
    undecided: int
    wrong: int  # good: rolled back; bad: promoted
    exposure: list[float]
    promote_times: list[float]
    shadow_times: list[float]


def row(candidate: Candidate, outcomes: list[Outcome]) -> Row:
    promoted = [o for o in outcomes if o.result == "promoted"]
    rolled = [o for o in outcomes if o.result == "rolled_back"]
    return Row(
        runs=len(outcomes), promoted=len(promoted), rolled_back=len(rolled),
        undecided=len(outcomes) - len(promoted) - len(rolled),
        wrong=len(promoted) if candidate.bad else len(rolled),
        exposure=[o.exposure for o in outcomes],
        promote_times=[o.at for o in promoted],
        shadow_times=[o.shadow_s for o in outcomes if o.shadow_s],
    )  # fmt: skip


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Summary:
    false_rollbacks: int
    good_runs: int
    missed_bad: int
    bad_runs: int
    exposure_ratio: float
    promote_ratio: float
    promote_ratio_by_rate: dict[float, float]
    worst_at_low: tuple[int, int]  # the most false rollbacks or misses of one cell at 1 rps
    wrong_at_high: int  # false rollbacks and misses at >= 10 rps


def summarize(table: dict[Cell, Row], rates: Sequence[float], ours: str = "ours") -> Summary:
    by_name = {c.name: c for c in CANDIDATES}
    good = [(k, r) for k, r in table.items() if k[2] == ours and not by_name[k[1]].bad]
    bad = [(k, r) for k, r in table.items() if k[2] == ours and by_name[k[1]].bad]
    ours_exposure = sum(sum(r.exposure) for _, r in bad)
    flagger_exposure = sum(sum(table[(k[0], k[1], "flagger")].exposure) for k, _ in bad)
    ratios: dict[float, float] = {}
    for rate in rates:
        mine = table[(rate, "good", ours)].promote_times
        theirs = table[(rate, "good", "flagger")].promote_times
        if mine and theirs:
            ratios[rate] = statistics.median(mine) / statistics.median(theirs)
        else:
            ratios[rate] = float("inf")
    low = [r for k, r in table.items() if k[2] == ours and k[0] < 10]
    return Summary(
        false_rollbacks=sum(r.wrong for _, r in good),
        good_runs=sum(r.runs for _, r in good),
        missed_bad=sum(r.wrong for _, r in bad),
        bad_runs=sum(r.runs for _, r in bad),
        exposure_ratio=ours_exposure / flagger_exposure if flagger_exposure else 0.0,
        promote_ratio=max(ratios.values()) if ratios else float("inf"),
        promote_ratio_by_rate=ratios,
        worst_at_low=(max((r.wrong for r in low), default=0), low[0].runs if low else 0),
        wrong_at_high=sum(r.wrong for k, r in table.items() if k[2] == ours and k[0] >= 10),
    )  # fmt: skip


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(table: dict[Cell, Row], rates: Sequence[float]) -> str:
    header = (f"{'rate':>5} {'candidate':<15} {'analysis':<8} {'promoted':>8} {'rolled':>7} "
              f"{'undec':>6} {'wrong':>6} {'exp p50':>9} {'exp p95':>9} {'prom p50':>9} "
              f"{'prom p95':>9} {'shadow p50':>10}")  # fmt: skip
    lines = [header]
    for rate in rates:
        for c in CANDIDATES:
            for analysis in ANALYSES:
                r = table[(rate, c.name, analysis)]
                lines.append(
                    f"{rate:>5g} {c.name:<15} {analysis:<8} {r.promoted:>8} "
                    f"{r.rolled_back:>7} {r.undecided:>6} {r.wrong:>6} "
                    f"{_fmt(pct(r.exposure, 0.5)):>9} {_fmt(pct(r.exposure, 0.95)):>9} "
                    f"{_fmt(pct(r.promote_times, 0.5)):>9} "
                    f"{_fmt(pct(r.promote_times, 0.95)):>9} "
                    f"{_fmt(pct(r.shadow_times, 0.5)):>10}"
                )
    return "\n".join(lines)


def run_benchmark(
    runs: int = RUNS,
    rates: Sequence[float] = RATES,
    jobs: int = 2,
    out: Callable[[str], None] = print,
) -> Summary:
    began = time.monotonic()
    results = run_all(rates, runs, jobs)
    by_name = {c.name: c for c in CANDIDATES}
    table = {cell: row(by_name[cell[1]], outcomes) for cell, outcomes in results.items()}
    out(f"rollout: {len(CANDIDATES)} candidates x rates {list(rates)} req/s x {runs} runs, "
        f"this project's default plan and Flagger's default analysis; horizon "
        f"{HORIZON_S} s")  # fmt: skip
    out(
        "columns: promoted / rolled back / undecided within the hour; wrong = good rolled "
        "back or bad promoted; exp = requests the candidate answered to callers in the hour "
        "(p50, p95 over runs); prom = seconds to promotion; shadow = seconds shadowing"
    )
    out(format_table(table, rates))
    s = summarize(table, rates)
    out("")
    by_rate = ", ".join(f"{r:g} req/s {v:.2f}" for r, v in s.promote_ratio_by_rate.items())
    out(f"time to promote a good candidate, median over Flagger's: {by_rate}")
    out(f"goals: >= 10 req/s no false rollback and no missed bad: "
        f"{'met' if s.wrong_at_high == 0 else f'NOT met ({s.wrong_at_high})'}; "
        f"1 req/s at most 1% of each: worst cell {s.worst_at_low[0]}/{s.worst_at_low[1]} "
        f"({'met' if s.worst_at_low[0] <= 0.01 * max(1, s.worst_at_low[1]) else 'NOT met'}); "
        f"bad exposure <= 0.5x Flagger's: {s.exposure_ratio:.3f}; "
        f"promotion no slower than Flagger's: worst {s.promote_ratio:.2f}")  # fmt: skip
    c = summarize(table, rates, "ours-canary")
    by_rate = ", ".join(f"{r:g} req/s {v:.2f}" for r, v in c.promote_ratio_by_rate.items())
    out(f"without the shadow phase (ours-canary): false rollbacks {c.false_rollbacks}/"
        f"{c.good_runs}, missed bad {c.missed_bad}/{c.bad_runs}, bad exposure vs Flagger's "
        f"{c.exposure_ratio:.3f}, time to promote over Flagger's: {by_rate}")  # fmt: skip
    out(f"elapsed: {time.monotonic() - began:.1f} s")
    out(
        f"RESULT rollout false_rollbacks={s.false_rollbacks}/{s.good_runs} "
        f"missed_bad={s.missed_bad}/{s.bad_runs} "
        f"bad_exposure_vs_flagger={s.exposure_ratio:.3f} "
        f"promote_time_vs_flagger={s.promote_ratio:.2f}"
    )
    return s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=RUNS,
                        help="seeded runs per cell (default: %(default)s)")  # fmt: skip
    parser.add_argument("--rate", type=float, action="append",
                        help="only this rate, req/s (repeatable; default: 1, 10, 100)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes (default: %(default)s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    run_benchmark(runs=max(1, args.runs), rates=args.rate or RATES, jobs=max(1, args.jobs))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "rollout",
        help="simulated rollouts: this project's analysis vs Flagger's default",
        description=(
            "Simulate (deterministic, seeded) rollouts of good and bad candidates at 1, 10 "
            "and 100 req/s through this project's rollout analysis and Flagger's default "
            "one. Ends with: RESULT rollout false_rollbacks=<n>/<runs> missed_bad=<n>/<runs> "
            "bad_exposure_vs_flagger=<ratio> promote_time_vs_flagger=<ratio>"
        ),
    )
    add_arguments(parser)
    parser.set_defaults(run=run)
