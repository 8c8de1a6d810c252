"""Third-party clients in environments of their own, as their users install them.

KServe's Python SDK (kserve 0.21.0) needs protobuf<7 and this project protobuf>=7.35 (its
generated UPI stubs), so the SDK can't live in the project's venv — nor does a KServe
user's client. Its venv is made from the hash-locked ``requirements/kserve-client.txt``
(compiled from ``kserve-client.in``; see the header of the lock for the command) at
``.cache/clients/kserve-<hash of the lock>``: once per lock, reused across runs, and a
changed lock gets a new venv. A file lock makes concurrent pytest processes build it
once. Tests run ``tests/kserve_client_script.py`` in it as a subprocess, against the real
gateway, and read its JSON.

A venv that can't be made fails the tests that need it, with pip's output: these tests
are the proof that KServe's clients work, so they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KSERVE_LOCK = ROOT / "requirements" / "kserve-client.txt"
KSERVE_SCRIPT = Path(__file__).with_name("kserve_client_script.py")
CLIENTS_DIR = ROOT / ".cache" / "clients"
# A bound on a stuck install (one is about a minute on this machine), not a timing test.
INSTALL_TIMEOUT = 900


def kserve_venv() -> Path:
    """The kserve client venv's python, made first if missing."""
    digest = hashlib.sha256(KSERVE_LOCK.read_bytes()).hexdigest()[:16]
    venv = CLIENTS_DIR / f"kserve-{digest}"
    python = venv / "bin" / "python"
    done = venv / ".complete"  # written last: a venv without it is a broken attempt
    CLIENTS_DIR.mkdir(parents=True, exist_ok=True)
    with (CLIENTS_DIR / f"kserve-{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = CLIENTS_DIR / f"kserve-{digest}.log"
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            # Niced: it is made while other tests run (build_in_background).
            ["nice", "-n", "10", str(python), "-m", "pip", "install",
             "--disable-pip-version-check", "--require-hashes", "-r", str(KSERVE_LOCK)],
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
                        f"could not make the kserve client venv at {venv}: `{' '.join(step)}` "
                        f"exited {code}. It needs PyPI through pip's configuration and a "
                        f"Python {sys.version_info.major}.{sys.version_info.minor} the lock "
                        f"(compiled for 3.11) has wheels for. Whole log: {log}\n{tail}",
                        pytrace=False,
                    )
        done.write_text(f"{KSERVE_LOCK.name} sha256 {digest}\n")
    return python


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    return kserve_venv()


def build_in_background() -> None:
    """Start making the kserve venv now, while the tests before its own run: on a new
    machine it takes about a minute. The fixture waits on the same file lock; if this
    attempt failed, the fixture's own attempt reports why."""

    def build() -> None:
        # pytest.fail's outcome is a BaseException: the fixture's own attempt reports it.
        with contextlib.suppress(BaseException):
            kserve_venv()

    threading.Thread(target=build, name="kserve-venv", daemon=True).start()


async def run_kserve(python: Path, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the client script with ``calls``; its results, one per call.

    Async, so a gateway on the test's own loop keeps serving while the client runs.
    """
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("PYTHONPATH", None)
    proc = await asyncio.create_subprocess_exec(
        str(python), str(KSERVE_SCRIPT),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=CLIENTS_DIR, env=env,
    )  # fmt: skip
    out, err = await proc.communicate(json.dumps(calls).encode())
    assert proc.returncode == 0, f"the kserve client script failed:\n{err.decode()}"
    results: list[dict[str, Any]] = json.loads(out)
    assert len(results) == len(calls), results
    return results
