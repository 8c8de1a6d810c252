"""``python -m loadtests.bench.grpc_servers.passthrough --port P --upstream HOST:PORT``: the
reference "plain grpc.aio pass-through" of the gRPC benchmark.

A ``grpc.aio`` server with one generic handler that takes every unary call as raw bytes
(no deserializing) and makes the same call, raw bytes again, on one channel to the
upstream, passing on the caller's deadline and answering with the upstream's message, or
its status and details. It routes nothing (grpc.aio can't see ``:authority``, see
docs/grpc-design.md): it is the cost of the plainest gRPC proxy one can write in Python.
Runs on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

Unary = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


class PassThrough(grpc.GenericRpcHandler):
    """Every method becomes a raw-bytes unary call of the same name on `channel`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = grpc.unary_unary_rpc_method_handler(self._forwarder(method))
            self._handlers[method] = handler
        return handler

    def _forwarder(self, method: str) -> Unary:
        # No serializers: bytes in, bytes out.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            try:
                response: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return response

        return forward


async def serve(host: str, port: int, upstream: str) -> None:
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
    async with grpc.aio.insecure_channel(upstream) as channel:
        server = grpc.aio.server(handlers=[PassThrough(channel)], options=options)
        if server.add_insecure_port(f"{host}:{port}") == 0:
            raise SystemExit(f"grpc pass-through: cannot listen on {host}:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"grpc.aio pass-through on {host}:{port} to {upstream}", flush=True)
        await stop.wait()
        await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench.grpc_servers.passthrough",
        description="grpc.aio generic raw-bytes pass-through to one upstream",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
