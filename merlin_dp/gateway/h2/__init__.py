"""The gateway's gRPC (UPI_V1) path: a frame-level HTTP/2 (h2c) proxy on asyncio protocols.

- :mod:`merlin_dp.gateway.h2.frames`: frame types, flags, error codes, serializers;
- :mod:`merlin_dp.gateway.h2.codec`: HPACK decoding behind a cache, stateless literal encoding;
- :mod:`merlin_dp.gateway.h2.connection`: what both ends share (parsing, SETTINGS, PING, flow
  control, send queues);
- :mod:`merlin_dp.gateway.h2.server`: client-facing connections, limits, the listener;
- :mod:`merlin_dp.gateway.pool.h2`: pooled connections to replicas;
- :mod:`merlin_dp.gateway.grpc.proxy`: one proxied call: routing, retries, deadline, metrics;
- :mod:`merlin_dp.gateway.grpc.mirror`: the shadow copy and its comparison.

See docs/grpc-design.md.
"""
