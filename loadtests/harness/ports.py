"""Waiting on a port: until it accepts a TCP connection (blocking, or on an event loop) or
until an HTTP GET on it answers 200, failing early with the log of the process that should
have opened it if that process exits. Free ports come from :mod:`merlin_dp.common.net`."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time

from loadtests.harness.errors import HarnessError
from loadtests.harness.processes import ChildProcess

STARTUP_TIMEOUT_S = 30.0


def _check_alive(proc: ChildProcess | None, what: str) -> None:
    if proc is not None:
        proc.check_alive(what)


def _not_accepting(
    host: str, port: int, timeout: float, exc: OSError, proc: ChildProcess | None
) -> HarnessError:
    detail = f": {proc.describe_failure()}" if proc is not None else ""
    return HarnessError(f"{host}:{port} not accepting after {timeout:.0f}s ({exc}){detail}")


def wait_for_port(
    host: str, port: int, *, timeout: float = STARTUP_TIMEOUT_S, proc: ChildProcess | None = None
) -> None:
    """Wait until `host:port` accepts a TCP connection (fail early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, f"waiting for {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise _not_accepting(host, port, timeout, exc, proc) from exc
            time.sleep(0.05)


async def wait_for_port_async(
    host: str, port: int, *, within: float = STARTUP_TIMEOUT_S, proc: ChildProcess | None = None
) -> None:
    """:func:`wait_for_port` for a caller on an event loop: the loop keeps running. Gives
    up after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        _check_alive(proc, f"waiting for {host}:{port}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            writer.close()
            return
        except OSError as exc:  # TimeoutError included
            if time.monotonic() > deadline:
                raise _not_accepting(host, port, within, exc, proc) from exc
            await asyncio.sleep(0.05)


def http_get(
    host: str, port: int, path: str, *, host_header: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One plain-HTTP GET; returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Host": host_header} if host_header is not None else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_http_ok(
    host: str,
    port: int,
    path: str,
    *,
    timeout: float = STARTUP_TIMEOUT_S,
    proc: ChildProcess | None = None,
) -> None:
    """Wait until GET `path` on `host:port` answers 200 (fail early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        _check_alive(proc, f"waiting for http://{host}:{port}{path}")
        try:
            status, _ = http_get(host, port, path, timeout=2.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise HarnessError(
                f"http://{host}:{port}{path} not ready after {timeout:.0f}s ({last})"
            )
        time.sleep(0.1)
