"""Child processes: starting one in its own session (pinned to CPUs with taskset when
asked) with its output in a log file, saying what went wrong when it exits early, and
stopping it together with whatever it left behind.

:class:`ChildProcess` is the one process class of the benchmarks, the soak and the tests'
real processes; :class:`ProcessSet` stops every process a block started, newest first,
however the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from loadtests.harness.errors import HarnessError
from loadtests.harness.procfs import ProcessId, descendants

STOP_GRACE_S = 15.0


def pin_argv(argv: Sequence[str], cpus: str | None) -> list[str]:
    """`argv` prefixed with `taskset -c CPUS` (unchanged when cpus is None)."""
    return ["taskset", "-c", cpus, *argv] if cpus is not None else list(argv)


def usable_cpus(sut_cpus: str, load_cpus: str) -> tuple[str | None, str | None]:
    """The CPU lists to pin to, or (None, None) with a warning when they aren't all here."""
    available = os.sched_getaffinity(0)
    wanted: set[int] = set()
    for spec in (sut_cpus, load_cpus):
        for part in spec.split(","):
            low, _, high = part.partition("-")
            wanted.update(range(int(low), int(high or low) + 1))
    if not wanted <= available:
        print(
            f"bench: warning: CPUs {sorted(wanted - available)} not available "
            f"(have {sorted(available)}); running unpinned, ratios will be noisier",
            file=sys.stderr,
        )
        return None, None
    return sut_cpus, load_cpus


class ChildProcess:
    """A process started in its own session, optionally pinned to CPUs with taskset, its
    stdout and stderr appended to `log_path`.

    Its own session makes it lead a process group: a signal to the group reaches what it
    started too (a supervisor's workers), and a Ctrl-C meant for the parent doesn't."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cpus: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cpus = cpus
        self.argv = pin_argv(argv, cpus)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        # taskset execs the command, so this is the pid of the command itself.
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe_failure(self) -> str:
        status = self.popen.poll()
        state = f"exited with {status}" if status is not None else "still running"
        tail = self.log_tail()
        if not tail:
            return f"{self.name} ({state}); empty log {self.log_path}"
        return f"{self.name} ({state}); log {self.log_path}:\n{tail}"

    def check_alive(self, what: str) -> None:
        """Raise HarnessError saying `what` was under way if the process has exited."""
        if self.exited():
            raise HarnessError(f"{what}: {self.describe_failure()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process's group, unless the process has exited."""
        if not self.exited():
            self._signal_group(sig)

    def stop(self, grace_seconds: float = STOP_GRACE_S) -> bool:
        """SIGTERM the process's group, SIGKILL it after `grace_seconds`, reap the process.
        False when the process ignored SIGTERM."""
        self._signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_seconds)
            graceful = True
        except subprocess.TimeoutExpired:
            graceful = False
        self._kill_group_and_reap()
        return graceful

    async def stop_async(self, grace_seconds: float = STOP_GRACE_S) -> bool:
        """:meth:`stop` for a caller on an event loop: the loop keeps running meanwhile."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while not self.exited() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        graceful = self.exited()
        self._kill_group_and_reap()
        return graceful

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # start_new_session: the process leads its own group

    def _kill_group_and_reap(self) -> None:
        # Kill anything left in the group (workers of a supervisor, a stuck process).
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5.0)


class ProcessSet:
    """The processes a block started; see :func:`managed_processes`."""

    def __init__(self) -> None:
        self.processes: list[ChildProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ChildProcess:
        proc = ChildProcess(name, argv, cpus=cpus, log_path=log_path, env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process, newest first; SIGKILL the rest if interrupted meanwhile."""
        try:
            while self.processes:
                proc = self.processes[-1]
                if not proc.stop():
                    print(f"bench: {proc.name} ignored SIGTERM, killing it", file=sys.stderr)
                self.processes.pop()
        except BaseException:
            for proc in self.processes:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self.processes.clear()
            raise


@contextlib.contextmanager
def managed_processes() -> Iterator[ProcessSet]:
    """A ProcessSet whose processes are all stopped, newest first, however the block ends."""
    procs = ProcessSet()
    try:
        yield procs
    finally:
        procs.stop_all()


def stop_leftovers(processes: Sequence[ProcessId], *, grace_seconds: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_seconds`, whichever of `processes` still run
    (replicas their controller should have stopped)."""
    left = [p for p in processes if p.alive()]
    if not left:
        return
    print(f"bench: stopping {len(left)} replica process(es) left behind", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(p.alive() for p in left):
            time.sleep(0.05)
        left = [p for p in left if p.alive()]
        if not left:
            return


@contextlib.contextmanager
def controller_replicas_stopped(procs: ProcessSet) -> Iterator[list[ProcessId]]:
    """Inside managed_processes: stop the replicas the controllers leave running.

    A controller's replicas run in their own sessions, so stopping the controller's group
    doesn't reach them; the controller stops them itself on SIGTERM. Yields a list to add
    replicas to as they start (a controller that dies leaves orphans no longer found
    under it); on the way out the controllers' current children are added, the block's
    processes are stopped, and then whichever replicas still run are stopped."""
    replicas: list[ProcessId] = []
    try:
        yield replicas
    finally:
        for proc in procs.processes:
            if proc.name == "controller" and not proc.exited():
                replicas += descendants(proc.pid)
        try:
            procs.stop_all()
        finally:
            stop_leftovers(list(dict.fromkeys(replicas)))
