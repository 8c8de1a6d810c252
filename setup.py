"""Build hook: generate the UPI v1 Python stubs from merlin_dp/protos/ before modules are collected.

Everything else about the build is in pyproject.toml. setuptools runs ``build_py`` for
wheels and for editable installs (``pip install -e .``) alike; the stubs are written into
the source tree (see merlin_dp/protos/_generate.py), where both kinds of install pick them up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py


def _generator() -> ModuleType:
    # Loaded by path: the project's own packages aren't importable while it is being built.
    path = Path(__file__).resolve().parent / "merlin_dp" / "protos" / "_generate.py"
    spec = importlib.util.spec_from_file_location("_protos_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _generator().generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
