"""Build hooks: the UPI v1 Python stubs, generated from merlin_dp/protos/ before modules are
collected; and the hot path compiled to C with mypyc (merlin_dp/common/hot_path.py says
which modules, and when a process uses them).

Everything else about the build is in pyproject.toml. setuptools runs ``build_py`` and
``build_ext`` for wheels and for editable installs (``pip install -e .``) alike; the stubs
and the compiled modules are written into the source tree for editable installs, where
the hot path's manifest keeps an edited source from being shadowed by a stale build.

The compile needs mypy (a build requirement) and a C compiler with Python's headers. A
build without them, or with ``MERLIN_DP_COMPILE=0``, installs the same modules as plain
Python: slower, never different.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Commands that build code; metadata-only runs (egg_info, dist_info, sdist) compile nothing.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _load(name: str, *parts: str) -> ModuleType:
    # By path: the project's own packages aren't importable while it is being built.
    spec = importlib.util.spec_from_file_location(name, ROOT.joinpath(*parts))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hot_path = _load("_merlin_hot_path", "merlin_dp", "common", "hot_path.py")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _load("_protos_generate", "merlin_dp", "protos", "_generate.py").generate()
        super().run()


class BuildHotPath(build_ext):
    """Compiles the hot path; a failed compile leaves it interpreted, not the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(f"merlin-dataplane: hot path left interpreted, compile failed: {exc}")
            return
        manifest = hot_path.MANIFEST
        if not (self.inplace or getattr(self, "editable_mode", False)):
            manifest = Path(self.build_lib, *hot_path.MANIFEST.relative_to(ROOT).parts)
        hot_path.write_manifest(manifest)


def _hot_path_extensions() -> list[Any]:
    if not BUILDING & set(sys.argv):
        return []
    # Until a compile succeeds, no earlier one is used: its manifest and its extensions
    # (the package has no other C code) go.
    hot_path.MANIFEST.unlink(missing_ok=True)
    for stale in hot_path.PACKAGE_DIR.rglob("*.so"):
        stale.unlink()
    if os.environ.get("MERLIN_DP_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("merlin-dataplane: hot path left interpreted: mypyc is not installed")
        return []
    try:
        paths = [str(hot_path.source_of(m).relative_to(ROOT)) for m in hot_path.MODULES]
        return list(mypycify(paths, opt_level="3", debug_level="0", group_name=hot_path.GROUP))
    except (Exception, SystemExit) as exc:
        print(f"merlin-dataplane: hot path left interpreted, mypyc failed: {exc}")
        return []


setup(
    cmdclass={"build_py": BuildPyWithProtos, "build_ext": BuildHotPath},
    ext_modules=_hot_path_extensions(),
)
