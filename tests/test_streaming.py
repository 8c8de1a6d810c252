"""Bodies far larger than the gateway's buffers stream through with bounded memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.conftest import Procs, model_endpoint, version, write_routes

MB = 1024 * 1024
BODY = 256 * MB
# The gateway may grow by its buffers (a few hundred KiB per stream) and allocator
# slack, never by the size of the body.
GROWTH_LIMIT = 48 * MB


def routes(tmp: Path, replica: str) -> Path:
    path = tmp / "routes.json"
    write_routes(
        path,
        {
            "version_endpoints": [version("fraud", "scorer", "1", [replica])],
            "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
        },
    )
    return path


async def test_upload_and_download_stream_with_bounded_memory(tmp_path: Path, procs: Procs) -> None:
    replica = procs.replica("big")
    gw, _ = procs.gateway(routes(tmp_path, f"127.0.0.1:{replica.port}"),
                          "--max-body-bytes", str(2 * BODY))  # fmt: skip
    url = f"http://127.0.0.1:{gw.port}"
    headers = {"Host": "scorer.fraud.localhost"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.get(f"{url}/", headers=headers) as resp:  # warm the pool
            await resp.read()
        before = gw.rss_bytes()

        async def body() -> AsyncIterator[bytes]:
            block = b"u" * MB
            for _ in range(BODY // MB):
                yield block

        # Upload (chunked, unknown length) to a replica that counts what it got.
        async with session.post(f"{url}/count", data=body(), headers=headers) as resp:
            assert resp.status == 200
            assert json.loads(await resp.read())["received"] == BODY
        after_upload = gw.peak_rss_bytes()

        # Download, read in small pieces so the gateway has to hold back the replica.
        got = 0
        async with session.get(f"{url}/big?bytes={BODY}", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["X-Model-Version"] == "1"
            async for chunk in resp.content.iter_chunked(64 * 1024):
                got += len(chunk)
        assert got == BODY
        after_download = gw.peak_rss_bytes()

        # Upload with a declared length, echoed straight back: both directions at once.
        payload = b"e" * (64 * MB)
        async with session.post(f"{url}/echo", data=payload, headers=headers) as resp:
            echoed = await resp.read()
        assert echoed == payload
    assert after_upload - before < GROWTH_LIMIT, (before, after_upload)
    assert after_download - before < GROWTH_LIMIT, (before, after_download)
