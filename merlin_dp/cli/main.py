"""The `merlin-dp` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from merlin_dp.cli import client as client_cli
from merlin_dp.cli import controller as cli_controller
from merlin_dp.cli import gateway as gateway_cli
from merlin_dp.cli import loadtest, up
from merlin_dp.cli import rollout as rollout_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merlin-dp",
        description=(
            "merlin-dataplane: the traffic-routing gateway and autoscaling data plane of an "
            "ML model serving platform. Every model gets one stable URL; the gateway splits "
            "its traffic across model versions."
        ),
        epilog="Run 'merlin-dp <command> --help' for a command's options.",
    )
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    up.add_parsers(sub)
    gateway_cli.add_parser(sub)
    cli_controller.add_parser(sub)
    client_cli.add_parsers(sub)
    rollout_cli.add_parser(sub)
    loadtest.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
