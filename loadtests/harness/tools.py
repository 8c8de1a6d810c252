"""The programs the load jobs and tests run (nginx, wrk, h2load, redis-server, chromium):
finding them, and installing their Debian packages when they are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from loadtests.harness.errors import HarnessError

# Debian package that provides each tool.
APT_PACKAGES: Mapping[str, str] = MappingProxyType({
    "nginx": "nginx-light",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "nghttp": "nghttp2-client",
    "redis-server": "redis-server",
    "chromium": "chromium",  # the web console's browser tests (tests/test_console.py)
})  # fmt: skip
# Where a tool may live outside a non-root PATH (nginx is in /usr/sbin).
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """The path of executable `name` on PATH or in the sbin directories, or None."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _EXTRA_TOOL_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def install_apt_packages(packages: Sequence[str]) -> None:
    """`apt-get install -y PACKAGES`, running `apt-get update` first if that fails."""
    if os.geteuid() != 0:
        raise HarnessError(f"need root to install {' '.join(packages)}; install them and rerun")
    if shutil.which("apt-get") is None:
        raise HarnessError(f"apt-get not found; install {' '.join(packages)} and rerun")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Waits for dpkg's lock: the tests may install two tools at once (a browser in the
    # background, nginx in the foreground).
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y",
               "--no-install-recommends", *packages]  # fmt: skip
    print(f"bench: installing {' '.join(packages)}", file=sys.stderr, flush=True)
    if subprocess.run(install, env=env, check=False, timeout=900).returncode == 0:
        return
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"], env=env, check=False,
                   timeout=900)  # fmt: skip
    if subprocess.run(install, env=env, check=False, timeout=900).returncode != 0:
        raise HarnessError(f"apt-get install {' '.join(packages)} failed")


def ensure_tools(names: Sequence[str]) -> dict[str, str]:
    """Find each tool in `names` (keys of APT_PACKAGES), installing missing ones."""
    paths = {name: find_tool(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        install_apt_packages(sorted({APT_PACKAGES[name] for name in missing}))
        paths = {name: find_tool(name) for name in names}
    found: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            raise HarnessError(f"{name} is still missing after installing {APT_PACKAGES[name]}")
        found[name] = path
    return found
