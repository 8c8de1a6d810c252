"""Where the controller's state lives between runs.

A :class:`Store` loads and saves the whole :class:`ControllerState` document, keeps an
append-only audit log, and hands out the write lease: a change is made as *take the
lease, load the latest state, apply, save if the revision is still the one loaded*.

:class:`FileStore` is the embedded default: one JSON file under the state directory,
replaced atomically (write a temp file, fsync it, rename, fsync the directory), so a
crash mid-write leaves either the old state or the new one, never a torn file. One
controller process owns it. :class:`~merlin_dp.controller.redis_store.RedisStore` lets several
controllers share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from merlin_dp.common.files import atomic_write
from merlin_dp.controller.models import ControllerState


class StoreError(RuntimeError):
    """The store could not be read or written; the message says why."""


class StaleState(StoreError):
    """Someone else saved a newer state since it was loaded."""


class Store(Protocol):
    description: str
    shared: bool  # other controllers may write it: reload before every change

    async def load(self) -> ControllerState | None: ...

    async def save(self, state: ControllerState, expected: int, routes: bytes) -> None:
        """Save if the stored revision is still ``expected``; publish ``routes``."""

    def lease(self) -> AbstractAsyncContextManager[None]:
        """Hold the write lease: one controller writes at a time."""

    def changes(self) -> AsyncIterator[int]:
        """Revisions other controllers saved (a local store has none)."""

    async def audit(self, entry: dict[str, Any]) -> None: ...

    async def read_audit(self, limit: int) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class FileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.audit_path = directory / "audit.log"
        self.description = f"file {self.path}"
        self.shared = False
        directory.mkdir(parents=True, exist_ok=True)

    async def load(self) -> ControllerState | None:
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        try:
            return ControllerState.model_validate_json(text)
        except ValueError as exc:
            raise StoreError(f"{self.path} is not a valid state document: {exc}") from exc

    async def save(self, state: ControllerState, expected: int, routes: bytes) -> None:
        data = state.model_dump_json().encode()
        await asyncio.to_thread(atomic_write, self.path, data)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        yield  # one process owns the file; the controller's own lock serialises writes

    async def changes(self) -> AsyncIterator[int]:
        await asyncio.Event().wait()  # nobody else writes this file
        yield 0

    async def audit(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        await asyncio.to_thread(_append, self.audit_path, line)

    async def read_audit(self, limit: int) -> list[dict[str, Any]]:
        try:
            lines = (await asyncio.to_thread(self.audit_path.read_text)).splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines[-limit:] if line.strip()]

    async def close(self) -> None:
        return None


def _append(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
