"""The command line of ``python -m loadtests.bench``: one subcommand per benchmark module,
SIGTERM treated as Ctrl-C so every started process is stopped, and a harness error
reported as ``bench: error: ...`` with exit code 2."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from loadtests.bench import autoscale, convergence, grpc, http, queue, rollout, shadow
from loadtests.harness.errors import HarnessError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Benchmarks of the gateway against native references (see "
        "shared/BENCHMARKING.md for the layout).",
    )
    sub = parser.add_subparsers(title="benchmarks", metavar="<benchmark>", required=True)
    for benchmark in (http, shadow, convergence, autoscale, grpc, queue, rollout):
        benchmark.add_parser(sub)
    return parser


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the `finally` blocks that stop the processes.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result: int = args.run(args)
        return result
    except HarnessError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; processes stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
