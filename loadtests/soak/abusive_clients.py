"""Scenario 8, ``abusive-clients``: raw-socket abusers beside the normal clients (and one
client opening a new connection per request): slowloris heads, a 1 MB header, a 100 MB
body (declared, and chunked), 5,000 idle connections and malformed requests in a loop.
What each abuser got is reported; the normal clients must not notice."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from loadtests.harness.prometheus import label_text, samples_named
from loadtests.soak.load import CLIENTS, exception_kind
from loadtests.soak.results import ScenarioResult
from loadtests.soak.scenario import Run, run_scenario, sleep_until, two_versions
from loadtests.soak.stack import HOST, MIB, Stack
from merlin_dp.common.net import LOOPBACK


def _status(data: bytes) -> str:
    """``HTTP 408`` from the start of an answer, or ``closed`` for none."""
    if not data:
        return "closed without an answer"
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return f"HTTP {m.group(1).decode()}" if m else f"garbage {data[:20]!r}"


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 10)


async def _read_answer(read: asyncio.Future[bytes]) -> str:
    try:
        return _status(read.result())
    except (ConnectionError, OSError) as exc:  # e.g. reset while we were still sending
        return "no answer read: " + exception_kind(exc).replace("connection ", "")


async def slowloris(port: int, limit: float) -> str:
    """A request head sent a byte a second; what the gateway did and when."""
    started = time.monotonic()
    try:
        reader, writer = await _connect(port)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {exception_kind(exc)}"
    head = f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
    read = asyncio.ensure_future(reader.read(65536))
    outcome = ""
    try:
        i = 0
        while time.monotonic() - started < limit and not read.done():
            byte = head[i : i + 1] or b"a"
            i += 1
            try:
                writer.write(byte)
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                outcome = f"write failed ({exception_kind(exc)})"
                break
            await asyncio.wait([read], timeout=1.0)
        took = time.monotonic() - started
        if read.done():
            outcome = f"{await _read_answer(read)} after {took:.0f} s"
        elif not outcome:
            outcome = f"still open after {limit:.0f} s ({i} bytes sent)"
        else:
            outcome += f" after {took:.0f} s"
    finally:
        read.cancel()
        writer.close()
    return outcome


async def big_header(port: int, size: int = MIB) -> str:
    """A request with one header of ``size`` bytes."""
    started = time.monotonic()
    reader, writer = await _connect(port)
    read = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        writer.write(f"GET /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ".encode())
        block = b"a" * 65536
        with contextlib.suppress(ConnectionError, OSError):
            while sent < size and not read.done():
                writer.write(block)
                await writer.drain()
                sent += len(block)
            if not read.done():
                writer.write(b"\r\n\r\n")
                await writer.drain()
        await asyncio.wait([read], timeout=10)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {took:.0f} s ({sent // 1024} KiB sent)"
        return f"{await _read_answer(read)} in {took:.2f} s after {sent // 1024} KiB of the header"
    finally:
        read.cancel()
        writer.close()


async def big_body(port: int, size: int = 100 * MIB, chunked: bool = False) -> str:
    """A POST with a ``size``-byte body, declared (Content-Length) or chunked; sent until
    the gateway answers, or all of it."""
    started = time.monotonic()
    reader, writer = await _connect(port)
    read = asyncio.ensure_future(reader.read(65536))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sent = 0
    try:
        writer.write(
            f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n".encode()
        )
        block = b"7" * (256 * 1024)
        frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
            await asyncio.wait([read], timeout=0.2)  # a fast refusal comes before any body
            while sent < size and not read.done() and time.monotonic() - started < 60:
                writer.write(frame)
                await writer.drain()
                sent += len(block)
            if chunked and not read.done():
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        await asyncio.wait([read], timeout=30)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {took:.0f} s ({sent / MIB:.1f} MB sent)"
        return f"{await _read_answer(read)} in {took:.2f} s after {sent / MIB:.1f} MB of the body"
    finally:
        read.cancel()
        writer.close()


def _request(head: str, *headers: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    lines = [head, f"Host: {HOST}", *headers, "", ""]
    return eol.join(lines).encode("latin-1") + body


MALFORMED: Mapping[str, bytes] = MappingProxyType(
    {
        "garbage request line": b"HELLO THERE\r\n\r\n",
        "binary junk": bytes(range(256)) * 4 + b"\r\n\r\n",
        "HTTP/9.9": _request("GET /v1/predict HTTP/9.9"),
        "space in a header name": _request("GET /v1/predict HTTP/1.1", "Bad Name: x"),
        "NUL in a header value": _request("GET /v1/predict HTTP/1.1", "X-A: a\0b"),
        "negative Content-Length": _request("POST /v1/predict HTTP/1.1", "Content-Length: -5"),
        "two Content-Lengths": _request(
            "POST /v1/predict HTTP/1.1", "Content-Length: 1", "Content-Length: 2", body=b"xx"
        ),
        "Content-Length and chunked": _request(
            "POST /v1/predict HTTP/1.1",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        "bad chunk size": _request(
            "POST /v1/predict HTTP/1.1", "Transfer-Encoding: chunked", body=b"zz\r\nxx\r\n0\r\n\r\n"
        ),
        "100 KB request line": _request("GET /" + "a" * 100_000 + " HTTP/1.1"),
        "bare LF line ends": _request("GET /v1/predict HTTP/1.1", eol="\n"),
    }
)


async def malformed(port: int, payload: bytes, wait: float = 5.0) -> tuple[str, float]:
    """Send one malformed request; (what came back, seconds)."""
    started = time.monotonic()
    try:
        reader, writer = await _connect(port)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {exception_kind(exc)}", 0.0
    read = asyncio.ensure_future(reader.read(65536))
    try:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(payload)
            await writer.drain()
        await asyncio.wait([read], timeout=wait)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {wait:g} s", took
        return await _read_answer(read), took
    finally:
        read.cancel()
        writer.close()


class IdleConnections:
    """``count`` connections that send nothing, held until :meth:`close`."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.started = time.monotonic()
        self.outcomes: Counter[str] = Counter()
        self.open = 0
        self.opened = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def open_all(self) -> float:
        """Open them (200 at a time); seconds it took."""
        sem = asyncio.Semaphore(200)
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for _ in range(self.count):
            done: asyncio.Future[None] = loop.create_future()
            ready.append(done)
            self._tasks.append(asyncio.create_task(self._one(sem, done)))
        await asyncio.wait(ready, timeout=60)
        return time.monotonic() - self.started

    async def _one(self, sem: asyncio.Semaphore, done: asyncio.Future[None]) -> None:
        try:
            async with sem:
                reader, writer = await _connect(self.port)
        except (OSError, TimeoutError) as exc:
            self.outcomes[f"connect failed: {exception_kind(exc)}"] += 1
            done.set_result(None)
            return
        self.opened += 1
        self.open += 1
        done.set_result(None)
        self._writers.append(writer)
        read = asyncio.ensure_future(reader.read(65536))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                took = time.monotonic() - self.started
                self.outcomes[f"{await _read_answer(read)} (by {took:.0f} s)"] += 1
                self.open -= 1
        finally:
            read.cancel()
            stop.cancel()

    async def close(self) -> None:
        self.outcomes[f"still open at the end ({time.monotonic() - self.started:.0f} s)"] += (
            self.open
        )
        self._stop.set()
        await asyncio.wait(self._tasks, timeout=10)
        for writer in self._writers:
            writer.close()


def _spread(values: Sequence[float]) -> str:
    if not values:
        return ""
    return f"{min(values):.2f}-{max(values):.2f} s" if len(values) > 1 else f"{values[0]:.2f} s"


async def scenario_abusive(
    workdir: Path,
    duration: float = 20.0,
    idle: int = 5000,
    slow: int = 20,
    big_headers: int = 3,
    big_bodies: int = 2,
    chunked_bodies: int = 1,
) -> ScenarioResult:
    raise_nofile(idle + 1000)

    async def action(stack: Stack, run: Run) -> None:
        port = stack.port
        notes = run.result.notes
        rss_samples: list[int] = []
        sampling = asyncio.Event()

        async def sample_rss() -> None:
            while not sampling.is_set():
                rss_samples.append(stack.gateway_rss()[0])
                await asyncio.sleep(0.25)

        idlers = IdleConnections(port, idle)
        sampler = asyncio.create_task(sample_rss())
        took = await idlers.open_all()
        notes.append(f"idle connections: {idlers.opened} of {idle} opened in {took:.1f} s")
        # The other abusers start once the idle connections are all open.
        end = time.monotonic() + duration
        metrics = await stack.gateway_metrics()
        open_now = samples_named(metrics, "gateway_client_connections")
        if open_now:
            notes.append(
                f"gateway_client_connections with them open: {int(sum(s.value for s in open_now))}"
            )
        slow_tasks = [asyncio.create_task(slowloris(port, max(1.0, end - time.monotonic())))
                      for _ in range(slow)]  # fmt: skip

        async def malformed_loop() -> dict[str, list[tuple[str, float]]]:
            seen: dict[str, list[tuple[str, float]]] = {k: [] for k in MALFORMED}
            while time.monotonic() < end - 1:
                for kind, payload in MALFORMED.items():
                    seen[kind].append(await malformed(port, payload))
                await asyncio.sleep(0.05)
            return seen

        async def spaced(make: Callable[[], Awaitable[str]], count: int) -> list[str]:
            out = []
            for i in range(count):
                out.append(await make())
                gap = (end - time.monotonic() - 2) / max(1, count - i)
                await asyncio.sleep(max(0.0, min(gap, 3.0)))
            return out

        bad = asyncio.create_task(malformed_loop())
        headers = asyncio.create_task(spaced(lambda: big_header(port), big_headers))
        bodies = asyncio.create_task(spaced(lambda: big_body(port), big_bodies))
        chunked = asyncio.create_task(spaced(lambda: big_body(port, chunked=True), chunked_bodies))
        for outcome in await headers:
            notes.append(f"1 MB header: {outcome}")
        for outcome in await bodies:
            notes.append(f"100 MB body (Content-Length): {outcome}")
        for outcome in await chunked:
            notes.append(f"100 MB body (chunked): {outcome}")
        for kind, outcomes in (await bad).items():
            counts = Counter(o for o, _ in outcomes)
            times = [t for _, t in outcomes]
            notes.append(
                f"malformed, {kind}: "
                + ", ".join(f"{n}x {o}" for o, n in counts.most_common())
                + (f" (in {_spread(times)})" if times else "")
            )
        slow_outcomes = Counter(await asyncio.gather(*slow_tasks))
        notes.append(
            f"slowloris x{slow}: " + ", ".join(f"{n}x {o}" for o, n in slow_outcomes.most_common())
        )
        await sleep_until(end)
        await idlers.close()
        notes.append(
            f"idle connections x{idle}: "
            + ", ".join(f"{n}x {o}" for o, n in idlers.outcomes.most_common() if n)
        )
        sampling.set()
        await sampler
        metrics = await stack.gateway_metrics()
        cut = samples_named(metrics, "gateway_client_connections_cut_total")
        if cut:
            notes.append(
                "gateway_client_connections_cut_total: "
                + ", ".join(
                    f"{s.labels.get('reason', label_text(s.labels))} {int(s.value)}" for s in cut
                )
            )
        if rss_samples:
            notes.append(
                f"gateway RSS sampled every 0.25 s: median "
                f"{statistics.median(rss_samples) / MIB:.0f} MB, "
                f"max {max(rss_samples) / MIB:.0f} MB"
            )

    return await run_scenario(
        workdir, 8, "abusive-clients",
        f"{duration:g} s beside {CLIENTS} keep-alive clients and 1 new-connection-per-request "
        f"client: {idle} idle connections, {slow} slowloris, {big_headers}x 1 MB header, "
        f"{big_bodies}x 100 MB body (declared) + {chunked_bodies}x chunked, malformed requests "
        "in a loop",
        two_versions({"1": 50, "2": 50}), action, fresh_clients=1, limit=duration + 180,
    )  # fmt: skip


def raise_nofile(needed: int) -> None:
    """Raise this process's open-file limit (inherited by the stack) to ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
