"""What ``/proc`` says about a process: its stat fields, its memory, its command line and
environment, whether it is still the same process, and the process tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name; index 0 is field 3 (state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def status_bytes(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``, ...) in bytes; None if
    the process is gone or has no such field."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cmdline(pid: int) -> str:
    """The process's command line, arguments separated by spaces ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    """The process's environment ({} if it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def gone_or_zombie(pid: int) -> bool:
    """True when the process no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return True
    return fields[:1] == ["Z"]


@dataclass(frozen=True)
class ProcessId:
    """A pid and its start time (field 22 of /proc/<pid>/stat), so a reused pid isn't
    mistaken for the process it once was."""

    pid: int
    start_ticks: str

    def alive(self) -> bool:
        """Running (not a zombie) and still the same process."""
        try:
            fields = stat_fields(self.pid)
        except OSError:
            return False
        return len(fields) > 19 and fields[0] != "Z" and fields[19] == self.start_ticks


def children_by_parent() -> dict[int, list[ProcessId]]:
    """Every process on the machine, grouped by its parent's pid (one pass over /proc)."""
    children: dict[int, list[ProcessId]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(int(entry.name))
            children.setdefault(int(fields[1]), []).append(ProcessId(int(entry.name), fields[19]))
        except (OSError, ValueError, IndexError):
            continue
    return children


def descendants(pid: int) -> list[ProcessId]:
    """The live descendants of `pid` (children in their own sessions included)."""
    children = children_by_parent()
    found: list[ProcessId] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found
