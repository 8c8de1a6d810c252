"""Command-line pieces the benchmarks share: argument types, the CPU layout's defaults,
and the options every interleaved-rounds benchmark takes."""

from __future__ import annotations

import argparse
from pathlib import Path

# Default CPU layout: the system under test alone on CPU 1, upstream and load on CPU 0.
DEFAULT_SUT_CPUS = "1"
DEFAULT_LOAD_CPUS = "0"
SATURATING_CONNECTIONS = 64


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_round_options(
    parser: argparse.ArgumentParser, *, c1: bool = True, baseline: bool = True
) -> None:
    """Options every interleaved-rounds benchmark takes (`--c1-seconds` only if `c1`)."""
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds",
        type=positive_int,
        default=10,
        help="seconds of each saturating run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=non_negative_int,
        default=2,
        help="seconds of warm-up before each saturating run (default: %(default)s)",
    )
    if c1:
        parser.add_argument(
            "--c1-seconds",
            type=positive_int,
            default=None,
            help="seconds of each c=1 latency run (default: min(5, --seconds))",
        )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=SATURATING_CONNECTIONS,
        help="connections of the saturating run (default: %(default)s)",
    )
    parser.add_argument(
        "--sut-cpu",
        default=DEFAULT_SUT_CPUS,
        help="CPU list (taskset -c) of the system under test (default: %(default)s)",
    )
    parser.add_argument(
        "--load-cpu",
        default=DEFAULT_LOAD_CPUS,
        help="CPU list (taskset -c) of the load generator and upstream (default: %(default)s)",
    )
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="extra gateway argument, repeatable; write options as "
                             "--gateway-arg=--workers=2")  # fmt: skip
    if baseline:
        parser.add_argument("--baseline-root", type=Path, metavar="DIR",
                            help="also run the gateway from this checkout (e.g. a git "
                            "worktree of the commit before a change) in every round")  # fmt: skip
