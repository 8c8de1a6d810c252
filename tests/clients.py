"""Third-party clients and servers in environments of their own, as their users install
them.

Each is a :class:`ClientEnv`: a venv made from a hash-locked requirements file (compiled
by ``scripts/lock.sh``; the lock's header names the command) at
``.cache/clients/<name>-<hash of the lock>``: once per lock, reused across runs, and a
changed lock gets a new venv. A file lock makes concurrent pytest processes build it
once. Two exist:

- ``kserve``: KServe's Python SDK (kserve 0.21.0) needs protobuf<7 and this project
  protobuf>=7.35 (its generated UPI stubs), so the SDK can't live in the project's venv
  — nor does a KServe user's client. Tests run ``tests/kserve_client_script.py`` in it
  as a subprocess, against the real gateway, and read its JSON.
- ``merlin-pyfunc``: the published merlin-sdk and merlin-pyfunc-server 0.50.0, which
  require Python < 3.11 and pin mlflow 1.26.1, pydantic 2.5.3 and protobuf<5; made with
  a Python 3.10 found on the machine (pyenv's, or ``python3.10`` on PATH).
  ``tests/test_merlin_published.py`` runs Merlin's own server from it as a version
  endpoint.

A venv that can't be made fails the tests that need it, with pip's output: these tests
are the proof that the published clients and servers work with this project, so they
never skip. The one exception: where the Python a lock needs isn't on the machine at
all, no download can provide it, and the test skips saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtests.harness.tools import ensure_tools, find_tool

ROOT = Path(__file__).resolve().parent.parent
KSERVE_SCRIPT = Path(__file__).with_name("kserve_client_script.py")
CLIENTS_DIR = ROOT / ".cache" / "clients"
# A bound on a stuck install (one is about a minute on this machine), not a timing test.
INSTALL_TIMEOUT = 900


@dataclass(frozen=True, slots=True)
class ClientEnv:
    """A venv made from ``lock``, named ``name``; tests ask for it by ``fixture``."""

    name: str
    lock: Path
    fixture: str
    # The Python it must be made with, "3.10"; None: the one running the tests.
    python: str | None = None


KSERVE = ClientEnv("kserve", ROOT / "requirements" / "kserve-client.txt", "kserve_python")
MERLIN_PYFUNC = ClientEnv(
    "merlin-pyfunc", ROOT / "requirements" / "merlin-pyfunc.txt", "merlin_python", "3.10"
)
CLIENT_ENVS = (KSERVE, MERLIN_PYFUNC)


def find_python(version: str) -> str | None:
    """An interpreter of exactly ``version`` ("3.10") on this machine, or None.

    pyenv's installs first, then ``python3.10`` on PATH. Each candidate is run and
    asked its version: pyenv puts a shim for every version it has on PATH, and the
    shim of a version that isn't selected exits with an error instead.
    """
    name = f"python{version}"
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = [str(p) for p in sorted(pyenv.glob(f"versions/{version}.*/bin/{name}"))]
    on_path = shutil.which(name)
    if on_path is not None:
        candidates.append(on_path)
    for candidate in candidates:
        try:
            said = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if said.returncode == 0 and said.stdout.strip() == version:
            return candidate
    return None


def base_python(env: ClientEnv) -> str:
    """The interpreter ``env``'s venv is made with; skips the test where it is missing."""
    if env.python is None:
        return sys.executable
    found = find_python(env.python)
    if found is None:
        pytest.skip(
            f"no Python {env.python} on this machine (not in pyenv's versions, not "
            f"python{env.python} on PATH), and the {env.name} environment "
            f"({env.lock.name}) requires it. Debian here ships only Python 3.11, and "
            f"nothing else on the network can provide {env.python}."
        )
    return found


def client_venv(env: ClientEnv) -> Path:
    """``env``'s venv's python, made first if missing."""
    base = base_python(env)
    digest = hashlib.sha256(env.lock.read_bytes()).hexdigest()[:16]
    stem = f"{env.name}-{digest}"
    venv = CLIENTS_DIR / stem
    python = venv / "bin" / "python"
    done = venv / ".complete"  # written last: a venv without it is a broken attempt
    CLIENTS_DIR.mkdir(parents=True, exist_ok=True)
    with (CLIENTS_DIR / f"{stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = CLIENTS_DIR / f"{stem}.log"
        steps = [
            [base, "-m", "venv", str(venv)],
            # Niced: it is made while other tests run (build_in_background).
            ["nice", "-n", "10", str(python), "-m", "pip", "install",
             "--disable-pip-version-check", "--require-hashes", "-r", str(env.lock)],
        ]  # fmt: skip
        with log.open("w") as out:
            for step in steps:
                try:
                    code = subprocess.run(
                        step, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        timeout=INSTALL_TIMEOUT, cwd=CLIENTS_DIR,
                    ).returncode  # fmt: skip
                except subprocess.TimeoutExpired:
                    code = -1
                if code != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    pytest.fail(
                        f"could not make the {env.name} venv at {venv}: `{' '.join(step)}` "
                        f"exited {code}. It needs PyPI through pip's configuration and a "
                        f"Python ({base}) the lock (compiled for {_compiled_for(env.lock)}) "
                        f"has wheels for. Whole log: {log}\n{tail}",
                        pytrace=False,
                    )
        done.write_text(f"{env.lock.name} sha256 {digest}, made with {base}\n")
    return python


def _compiled_for(lock: Path) -> str:
    """The Python version the lock's header says it was compiled for."""
    found = re.search(r"--python-version (\S+)", lock.read_text()[:2000])
    return found.group(1) if found else "an unknown Python"


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    return client_venv(KSERVE)


@pytest.fixture(scope="session")
def merlin_python() -> Path:
    """The python of a venv with merlin-sdk and merlin-pyfunc-server 0.50.0."""
    return client_venv(MERLIN_PYFUNC)


def build_in_background(envs: Iterable[ClientEnv]) -> None:
    """Start making ``envs``' venvs now, one after another, while the tests before their
    own run: on a new machine each takes about a minute. The fixtures wait on the same
    file locks; if an attempt here failed (or skipped), the fixture's own attempt
    reports why."""
    todo = list(envs)
    if not todo:
        return

    def build() -> None:
        for env in todo:
            # pytest.fail's and pytest.skip's outcomes are BaseExceptions: the fixture's
            # own attempt reports them.
            with contextlib.suppress(BaseException):
                client_venv(env)

    threading.Thread(target=build, name="client-venvs", daemon=True).start()


async def run_kserve(python: Path, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the client script with ``calls``; its results, one per call.

    Async, so a gateway on the test's own loop keeps serving while the client runs.
    """
    proc = await asyncio.create_subprocess_exec(
        str(python), str(KSERVE_SCRIPT),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=CLIENTS_DIR, env=client_environ(),
    )  # fmt: skip
    out, err = await proc.communicate(json.dumps(calls).encode())
    assert proc.returncode == 0, f"the kserve client script failed:\n{err.decode()}"
    results: list[dict[str, Any]] = json.loads(out)
    assert len(results) == len(calls), results
    return results


def client_environ() -> dict[str, str]:
    """This process's environment for a client venv's process: no proxy (its calls go
    to servers on this machine) and no PYTHONPATH (it would put this project's modules,
    built for another Python, on the client's path)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("PYTHONPATH", None)
    return env


_BROWSER_INSTALL = threading.Lock()


def chromium() -> str:
    """Debian's chromium, installed (apt-get) when missing; one attempt at a time."""
    with _BROWSER_INSTALL:
        return ensure_tools(["chromium"])["chromium"]


def install_browser_in_background() -> None:
    """Start installing chromium now if it is missing: on a new machine apt takes about a
    minute, which the tests before the console's then hide. The fixture waits on the same
    lock; if this attempt failed, the fixture's own attempt reports why."""
    if find_tool("chromium") is not None:
        return

    def install() -> None:
        with contextlib.suppress(Exception):
            chromium()

    threading.Thread(target=install, name="chromium-install", daemon=True).start()
