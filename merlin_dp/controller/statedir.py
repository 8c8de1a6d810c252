"""One process per state directory.

A state directory holds the controller's state document (file store) and the local
runtime's replica records. Two processes on one directory undo each other: the second
takes the first one's live replicas for orphans of a crash and stops them, and both
write ``state.json``. So whoever uses a directory first holds an exclusive ``flock`` on
its ``lock`` file for as long as it runs; the kernel drops the lock when the process
exits, however it exits (``kill -9`` too), so a crash never leaves a stale lock behind.
The holder writes its pid and command line into the file, so a refused process can say
who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from merlin_dp.common.files import process_cmdline

LOCK_NAME = "lock"


class StateDirInUse(Exception):
    """Another live process holds the state directory; the message names it."""


class StateDirLock:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StateDirInUse`; touches nothing else."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: replicas must not inherit the descriptor, or a replica that outlives
        # a crashed controller would keep the directory locked.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(self._refusal()) from None
        except OSError:
            os.close(fd)
            raise
        pid = os.getpid()
        record = f"{pid}\n{process_cmdline(pid)}\n".encode()
        # Overwrite, then cut: a reader never sees an empty file between the two.
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        self._fd = fd

    def release(self) -> None:
        # The file stays: deleting it would let a newcomer lock a fresh inode while a
        # process that opened the old one still believes it holds the directory.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _refusal(self) -> str:
        where = f"the state directory {self.directory.resolve()} is in use"
        pid, recorded = self._holder()
        if pid is None:
            holder = " by another process (it has not recorded its pid yet)"
        else:
            command = process_cmdline(pid) or recorded
            holder = f" by pid {pid}" + (f" ({command})" if command else "")
        return f"{where}{holder}; stop that process first, or give another --state-dir"

    def _holder(self) -> tuple[int | None, str]:
        # The holder writes its record just after taking the lock: give it a moment.
        for _ in range(20):
            try:
                first, _, rest = self.path.read_text(errors="replace").partition("\n")
            except OSError:
                return None, ""
            if first.strip().isdigit():
                return int(first), rest.strip()
            time.sleep(0.05)
        return None, ""
