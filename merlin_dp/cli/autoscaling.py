"""The autoscaler's cluster-wide timings as command-line options (``merlin-dp up`` and
``merlin-dp controller``), and their validation."""

from __future__ import annotations

import argparse
from dataclasses import replace

from merlin_dp.autoscaler.policy import PolicyConfig


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster-wide timings users tune (Knative's config-autoscaler has the same)."""
    d = PolicyConfig()
    g = p.add_argument_group("autoscaling timings (for every version endpoint)")
    g.add_argument("--stable-window", type=float, default=d.stable_window, metavar="SECONDS",
                   help="requests are averaged over this window to size replicas")  # fmt: skip
    g.add_argument("--scale-down-delay", type=float, default=d.scale_down_delay,
                   metavar="SECONDS",
                   help="the peak of this window holds before scaling down")  # fmt: skip
    g.add_argument("--scale-to-zero-grace", type=float, default=d.scale_to_zero_grace,
                   metavar="SECONDS",
                   help="idle this long before a min_replica 0 version goes to zero")  # fmt: skip
    g.add_argument("--forecast-min-period", type=float, default=d.forecast_min_period,
                   metavar="SECONDS",
                   help="periodic load repeating at least this far apart is forecast and "
                   "pre-warmed one start-up time ahead")  # fmt: skip


def timings_from(args: argparse.Namespace) -> PolicyConfig:
    for name in ("stable_window", "scale_down_delay", "scale_to_zero_grace",
                 "forecast_min_period"):  # fmt: skip
        if not 0 <= getattr(args, name) <= 3600:
            raise SystemExit(f"merlin-dp: --{name.replace('_', '-')} must be 0-3600 seconds")
    if args.stable_window < 1:
        raise SystemExit("merlin-dp: --stable-window must be at least 1 second")
    return replace(
        PolicyConfig(),
        stable_window=args.stable_window,
        panic_window=max(1.0, args.stable_window / 10),  # Knative: 10% of the stable window
        scale_down_delay=args.scale_down_delay,
        scale_to_zero_grace=args.scale_to_zero_grace,
        forecast_min_period=max(2.0, args.forecast_min_period),
    )
