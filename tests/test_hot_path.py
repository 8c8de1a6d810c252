"""The compiled hot path: CI's install compiles it and the gateway runs it; a source edited
after the build runs as source, all four modules together; the environment can ask for
source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from merlin_dp.common import hot_path
from tests.conftest import ROOT

PROBE = (
    "import json, importlib, merlin_dp.common.hot_path as h; "
    "files = [importlib.import_module(m).__file__ for m in h.MODULES]; "
    "print(json.dumps({'state': h.state, 'files': files}))"
)


def probe(pythonpath: Path, **env: str) -> tuple[str, list[Path]]:
    """What a new process decides, and the files its hot-path modules came from."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=pythonpath, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(pythonpath), **env}, check=True, timeout=60,
    ).stdout  # fmt: skip
    result = json.loads(out)
    return result["state"], [Path(f) for f in result["files"]]


def test_the_install_compiled_the_hot_path_and_processes_run_it() -> None:
    # The test command's install has mypy and a C compiler: a hot path left interpreted
    # here is a broken build, not a slower one.
    assert hot_path.state == "compiled", f"{hot_path.state}; `pip install -e .` compiles it"
    state, files = probe(ROOT)
    assert state == "compiled"
    assert {f.suffix for f in files} == {".so"}


def test_an_edited_source_runs_as_source_with_the_rest_of_the_hot_path(tmp_path: Path) -> None:
    copy = tmp_path / "merlin_dp"
    shutil.copytree(ROOT / "merlin_dp", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert probe(tmp_path)[0] == "compiled"  # the copy, as built
    source = copy / "gateway" / "pool" / "http1.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    state, files = probe(tmp_path)
    assert state == (
        "interpreted: sources edited since the build compiled them (pip install again to compile)"
    )
    assert {f.suffix for f in files} == {".py"}
    assert all(f.is_relative_to(copy) for f in files)


def test_the_environment_can_ask_for_source() -> None:
    state, files = probe(ROOT, MERLIN_DP_HOT_PATH="interpreted")
    assert state == "interpreted: MERLIN_DP_HOT_PATH=interpreted"
    assert {f.suffix for f in files} == {".py"}
