"""The one error the harness and everything built on it raise."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """A step could not run: a tool missing, a process that didn't start or exited, a call
    that failed. The benchmarks report it as an error, the soak as a scenario's error; it
    is never a measurement."""
