"""The compiled hot path: which modules the build compiles with mypyc, and whether this
process runs them compiled.

The gateway's per-request modules (:data:`MODULES`) are ordinary typed Python. When
the build has mypyc (``pip install``; see setup.py), it also compiles them to C
extensions beside their sources and writes :data:`MANIFEST`, the SHA-256 of each source
it compiled. A process uses the extensions only when every source still has the hash
the manifest recorded: a source edited since the build (an editable install) runs as
source, all of them together, because compiled modules call each other natively and one
stale module among them would run old code. ``MERLIN_DP_HOT_PATH=interpreted`` asks for
source too (to compare, or to debug).

Stdlib only: setup.py loads this file by path while the package isn't importable yet.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # merlin_dp/
MODULES = (
    # The HTTP front and the replica client: every request's bytes.
    "merlin_dp.gateway.http.connection",
    "merlin_dp.gateway.http.request",
    "merlin_dp.gateway.http.responses",
    "merlin_dp.gateway.http.proxy",
    "merlin_dp.gateway.http.mirror",
    "merlin_dp.gateway.pool.http1",
    # What both fronts call per request: the choice of version and replica, the
    # replicas' health, the counters, the mirror's comparison.
    "merlin_dp.gateway.routing.table",
    "merlin_dp.gateway.routing.choice",
    "merlin_dp.gateway.routing.balancer",
    "merlin_dp.gateway.pool.upstream",
    "merlin_dp.gateway.metrics",
    "merlin_dp.gateway.mirror",
    # The gRPC front and its HTTP/2, both ways: every call's frames.
    "merlin_dp.gateway.h2.codec",
    "merlin_dp.gateway.h2.connection",
    "merlin_dp.gateway.h2.flow",
    "merlin_dp.gateway.h2.frames",
    "merlin_dp.gateway.h2.limits",
    "merlin_dp.gateway.h2.server",
    "merlin_dp.gateway.h2.settings",
    "merlin_dp.gateway.h2.streams",
    "merlin_dp.gateway.grpc.proxy",
    "merlin_dp.gateway.grpc.request",
    "merlin_dp.gateway.grpc.status",
    "merlin_dp.gateway.grpc.mirror",
    "merlin_dp.gateway.pool.h2",
)
MANIFEST = PACKAGE_DIR / "_compiled.json"
# The shared library mypyc builds for the modules together, beside them in the package.
GROUP = "merlin_dp.gateway.hot"
ENV = "MERLIN_DP_HOT_PATH"

# What this process runs: "compiled", or "interpreted: <why>"; set once by install().
state = ""


def source_of(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def digests(modules: Sequence[str] = MODULES) -> dict[str, str]:
    return {m: hashlib.sha256(source_of(m).read_bytes()).hexdigest() for m in modules}


def write_manifest(path: Path = MANIFEST) -> None:
    """Record the sources just compiled (the build calls this after a successful build)."""
    path.write_text(json.dumps({"modules": digests()}, indent=1, sort_keys=True) + "\n")


def recorded() -> dict[str, str]:
    """The manifest's modules and hashes; empty without a readable manifest."""
    try:
        modules = json.loads(MANIFEST.read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return modules if isinstance(modules, dict) else {}


def _why_not_compiled(built: dict[str, str]) -> str | None:
    if os.environ.get(ENV, "") == "interpreted":
        return f"{ENV}=interpreted"
    if not built:
        return "not compiled by the build (no mypyc, or the build was told not to)"
    if built != digests():
        return "sources edited since the build compiled them (pip install again to compile)"
    if not all(_extension_of(m) for m in MODULES):
        return "the build's compiled modules are missing"
    return None


def _extension_of(module: str) -> Path | None:
    source = source_of(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the given modules as source, ahead of the extensions beside them."""

    def __init__(self, modules: set[str]) -> None:
        self.modules = modules

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def install() -> str:
    """Decide, once per process and before any hot-path module is imported, whether they
    run compiled; returns :data:`state`."""
    global state
    if state:
        return state
    built = recorded()
    why = _why_not_compiled(built)
    if why is None:
        state = "compiled"
    else:
        state = f"interpreted: {why}"
        # The build's modules too: one dropped from MODULES since still has its
        # extension beside its source.
        ours = {m for m in {*MODULES, *built} if m.startswith("merlin_dp.")}
        sys.meta_path.insert(0, _FromSource(ours))
    return state
